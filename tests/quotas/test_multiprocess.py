"""Gateways in separate processes share one Redis budget exactly, and a killed one leaks nothing."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc

from tests.quotas.conftest import REDIS_URL, eventually, refused
from tokenwire.proto.testing.v1 import echo_pb2, echo_pb2_grpc
from tokenwire.quotas import Slot
from tokenwire.quotas.redis import RedisQuotaStore

ROOT = Path(__file__).resolve().parents[2]
Request = echo_pb2.EchoRequest
ANONYMOUS_STREAMS = Slot("{default}:u:anonymous:streams", 1)  # no authentication: anonymous


@asynccontextmanager
async def gateway(
    *options: str,
) -> AsyncIterator[tuple[echo_pb2_grpc.EchoServiceStub, Callable[[], None]]]:
    """A gateway process (tests/quotas/gateway.py): a stub to it, and a way to SIGKILL it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.quotas.gateway",
        *options,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        port = int(await asyncio.wait_for(process.stdout.readline(), 20))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield (
                echo_pb2_grpc.EchoServiceStub(channel),
                lambda: process.send_signal(signal.SIGKILL),
            )
    finally:
        if process.returncode is None:
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_two_gateways_admit_n_requests_in_total_not_2n(redis_prefix: str) -> None:
    """With N = 5 per minute, 16 calls spread over two gateway processes: exactly 5 pass."""
    options = ("--redis-url", REDIS_URL, "--key-prefix", redis_prefix, "--requests-per-minute", "5")
    async with AsyncExitStack() as stack:
        stubs = await asyncio.gather(*(stack.enter_async_context(gateway(*options)) for _ in "ab"))
        # Two calls through each gateway in turn, then twelve at once through both.
        first = [await _code(stubs[i % 2][0].Unary(Request(text="x"))) for i in range(4)]
        burst = await asyncio.gather(
            *(_code(stubs[i % 2][0].Unary(Request(text="x"))) for i in range(12))
        )
    assert [grpc.StatusCode.OK] * 4 == first
    assert 1 == burst.count(grpc.StatusCode.OK)
    assert 11 == burst.count(grpc.StatusCode.RESOURCE_EXHAUSTED)


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_killed_gateways_stream_slots_expire(redis_prefix: str) -> None:
    """A gateway killed mid-stream stops renewing its lease; the slot frees within the TTL."""
    options = ("--redis-url", REDIS_URL, "--key-prefix", redis_prefix)
    options += ("--concurrent-streams", "1", "--lease-ttl-s", "1")
    observer = RedisQuotaStore(REDIS_URL, key_prefix=redis_prefix)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(observer.close)
        (doomed, kill), (survivor, _) = await asyncio.gather(
            *(stack.enter_async_context(gateway(*options)) for _ in "ab")
        )
        stream = doomed.Bidi()
        await stream.write(Request(text="held"))
        assert "held" == (await stream.read()).text
        await asyncio.sleep(1.5)  # beyond the TTL: the live gateway renews its lease
        assert 1 == await observer.in_use(ANONYMOUS_STREAMS)
        refusal = await refused(survivor.Bidi().read())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED == refusal.code
        kill()
        stream.cancel()
        assert 0 == await eventually(lambda: observer.in_use(ANONYMOUS_STREAMS), 0, limit_s=3.0)
        admitted = survivor.Bidi()
        await admitted.write(Request(text="next"))
        assert "next" == (await admitted.read()).text
        admitted.cancel()
