"""`tokenwire serve` as a real process: SIGTERM drains in-flight streams; JSON logs carry ids."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator

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
