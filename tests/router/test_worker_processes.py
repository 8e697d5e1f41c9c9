"""A gateway over three worker processes: crashes, drains and restarts, as in production."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenwire.proto.v1 import chat_pb2
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import RunningServer, config_for_tests, running_server

OWNER = "default/anonymous"
TOKEN = "worker-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    """``tokenwire worker`` with the fake engine, answering ``letter`` forever."""

    def __init__(self, letter: str, delay_s: float) -> None:
        self.letter = letter
        self.delay_s = delay_s
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        options = f"reply={self.letter},endless=true,token_delay_s={self.delay_s}"
        command = [sys.executable, "-m", "tokenwire", "worker", "--backend", "fake"]
        command += ["--listen", self.address, "--set", f"backend.options={options}"]
        command += ["--set", f"worker.token={TOKEN}", "--set", "logging.level=warning"]
        self.process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(300):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"worker {self.letter} did not start")

    def signal(self, sig: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait(30)


@contextlib.asynccontextmanager
async def fleet_of_three(
    store: SQLiteConversationStore,
) -> AsyncIterator[tuple[RunningServer, RoutedEngine, list[WorkerProcess]]]:
    workers = [WorkerProcess("A", 0.02), WorkerProcess("B", 0.01), WorkerProcess("C", 0.005)]
    try:
        await asyncio.gather(*(w.start() for w in workers))
        config = RouterConfig(
            workers=",".join(w.address for w in workers),
            token=TOKEN,
            poll_interval_s=0.02,
            eject_s=0.2,
            policy="least_requests",
        )
        engine = RoutedEngine(config)
        async with running_server(engine, config_for_tests(router=config), store=store) as running:
            yield running, engine, workers
    finally:
        for w in workers:
            if w.process is not None and w.process.poll() is None:
                w.process.kill()
                w.process.wait()


async def answer(running: RunningServer, max_tokens: int) -> tuple[str, str, grpc.StatusCode]:
    """(conversation id, text, status) of one Complete turn."""
    request = chat_pb2.CompleteRequest(
        message="go", params=chat_pb2.SamplingParams(max_tokens=max_tokens)
    )
    conversation, text = "", ""
    try:
        async for event in running.chat.Complete(request):
            if event.HasField("started"):
                conversation = event.started.conversation_id
            text += event.delta.text
    except grpc.aio.AioRpcError as exc:
        return conversation, text, exc.code()
    return conversation, text, grpc.StatusCode.OK


async def test_sigkill_fails_only_the_turns_streaming_from_that_worker() -> None:
    """SIGKILL of a worker ends its streaming turns with UNAVAILABLE and their partial text
    stored; turns on other workers and every turn started afterwards succeed."""
    store = SQLiteConversationStore(":memory:")
    async with fleet_of_three(store) as (running, _, workers):
        turns = [asyncio.create_task(answer(running, 150)) for _ in range(6)]
        await asyncio.sleep(0.8)  # every turn is streaming: A's take 3 s, C's under 1 s
        workers[0].signal(signal.SIGKILL)
        results = await asyncio.gather(*turns)
        after = await asyncio.gather(*(answer(running, 20) for _ in range(9)))
        stored = {c: (await store.list_messages(OWNER, c))[-1] for c, text, _ in results if text}
    cut = [r for r in results if r[1].startswith("A")]
    assert cut, "no turn was on the killed worker"
    assert all(grpc.StatusCode.UNAVAILABLE == code for _, _, code in cut)
    assert all((text, False) == (stored[c].content, stored[c].complete) for c, text, _ in cut)
    assert all(code == grpc.StatusCode.OK for _, t, code in results if not t.startswith("A"))
    assert [grpc.StatusCode.OK] * 9 == [code for _, _, code in after]
    assert not any(text.startswith("A") for _, text, _ in after)


async def test_drain_finishes_streams_takes_no_new_turns_and_a_restart_rejoins() -> None:
    """SIGTERM lets a worker's streaming turns finish while new turns go elsewhere; the
    worker started again on its port takes turns again."""
    store = SQLiteConversationStore(":memory:")
    async with fleet_of_three(store) as (running, engine, workers):
        turns = [asyncio.create_task(answer(running, 40)) for _ in range(6)]
        await asyncio.sleep(0.3)
        workers[0].signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        during = await asyncio.gather(*(answer(running, 10) for _ in range(6)))
        results = await asyncio.gather(*turns)
        assert 0 == workers[0].wait()
        await workers[0].start()
        for _ in range(200):
            if len(engine.fleet.usable()) == 3:
                break
            await asyncio.sleep(0.05)
        rejoined = await asyncio.gather(*(answer(running, 5) for _ in range(9)))
    drained = [r for r in results if r[1].startswith("A")]
    assert drained, "no turn was on the drained worker"
    assert all(("A" * 40, grpc.StatusCode.OK) == (t, code) for _, t, code in drained)
    assert all(code == grpc.StatusCode.OK for _, _, code in during)
    assert not any(text.startswith("A") for _, text, _ in during)
    assert any(text.startswith("A") for _, text, _ in rejoined)
