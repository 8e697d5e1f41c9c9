"""`tokenwire serve` as a real process: SIGTERM drains in-flight streams; JSON logs carry ids."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import spawn_server
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc

REPLY = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture
async def serve_process(tmp_path: object) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`tokenwire serve` with the fake backend, slow tokens and JSON logs, on a free port."""
    process, address = await spawn_server(
        f"backend.options=reply={REPLY},token_delay_s=0.03",
        "store.sqlite_path=:memory:",
        "auth.enabled=false",
        "server.grace_period_s=20",
    )
    try:
        yield process, address
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_drains_the_stream_then_exits(
    serve_process: tuple[asyncio.subprocess.Process, str],
) -> None:
    """SIGTERM mid-stream: the answer completes, exit 0, each call log line has the request id."""
    process, address = serve_process
    async with grpc.aio.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.Complete(chat_pb2.CompleteRequest(message="go"))
        events = [await anext(aiter(call)), await anext(aiter(call))]
        process.send_signal(signal.SIGTERM)
        events += [event async for event in call]
    assert REPLY == "".join(e.delta.text for e in events if e.HasField("delta"))
    assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason
    assert 0 == await asyncio.wait_for(process.wait(), 30)
    assert process.stderr is not None
    records = [json.loads(line) for line in (await process.stderr.read()).splitlines() if line]
    call_records = [r for r in records if r.get("method") == "/tokenwire.v1.ChatService/Complete"]
    assert {"turn started", "turn finished", "rpc finished"} <= {r["event"] for r in call_records}
    assert 1 == len({r["request_id"] for r in call_records})
    assert "draining" in [r["event"] for r in records]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    if not Path(f"/proc/{pid}/task").exists():
        return found
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


async def test_processes_share_one_port_and_drain_together(tmp_path: Path) -> None:
    """`serve --processes 2`: two processes answer on one port, their metrics add up on
    the first one's endpoint; SIGTERM stops both, exit 0."""
    port, metrics_port, http_port = _free_port(), _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenwire", "serve", "--backend", "fake", "--processes", "2",
        "--listen", address, "--set", "auth.enabled=false",
        "--set", f"store.data_dir={tmp_path}", "--set", "logging.level=warning",
        "--set", "metrics.enabled=true", "--set", f"metrics.listen=127.0.0.1:{metrics_port}",
        "--set", "http.enabled=true", "--set", f"http.listen=127.0.0.1:{http_port}",
    )  # fmt: skip
    try:
        children: list[int] = []
        for _ in range(600):
            children = [c for c in _children(process.pid) if _is_gateway(c)]
            if children:
                break
            await asyncio.sleep(0.05)
        assert 1 == len(children)
        texts = []
        for _ in range(6):  # new channels: the kernel spreads connections over both
            for _ in range(100):
                try:
                    async with grpc.aio.insecure_channel(address) as channel:
                        stub = chat_pb2_grpc.ChatServiceStub(channel)
                        events = [
                            e async for e in stub.Complete(chat_pb2.CompleteRequest(message="hi"))
                        ]
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            texts.append("".join(e.delta.text for e in events if e.HasField("delta")))
        scraped = await asyncio.to_thread(_scrape, metrics_port)
        models = await asyncio.to_thread(_get, f"http://127.0.0.1:{http_port}/v1/models")
        assert not _is_gone(children[0])  # the second process still serves (gRPC only)
        process.send_signal(signal.SIGTERM)
        assert 0 == await asyncio.wait_for(process.wait(), 60)
        assert _is_gone(children[0])
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert ["Hello from the fake backend."] * 6 == texts
    assert '"id":"fake"' in models.replace(" ", "")  # one HTTP edge, the first process's
    turns = 'tokenwire_turns_total{ending="stop",model="fake",tenant="default"}'
    assert f"{turns} 6.0" in scraped.splitlines()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _is_gateway(pid: int) -> bool:
    """A spawned gateway process (not multiprocessing's resource tracker)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _is_gone(pid: int) -> bool:
    """Exited (reaped, or a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


async def test_processes_need_a_fixed_port() -> None:
    """`serve --processes 2` on port 0 is refused at start-up with a clear message."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenwire", "serve", "--backend", "fake", "--processes", "2",
        "--listen", "127.0.0.1:0", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    assert 2 == process.returncode
    assert b"fixed port" in err
