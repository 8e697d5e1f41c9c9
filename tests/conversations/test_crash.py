"""kill -9 mid-answer, then restart on the same database: nothing lost, nothing corrupt."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc

from tests.conftest import spawn_server
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc, conversations_pb2_grpc
from tokenwire.proto.v1 import conversations_pb2 as cv

REPLY = "abcdefghijklmnopqrstuvwxyz"


async def _serve(database: Path) -> tuple[asyncio.subprocess.Process, str]:
    """`tokenwire serve` (fake engine, slow tokens, auth off) on ``database``."""
    return await spawn_server(
        f"backend.options=reply={REPLY},token_delay_s=0.05",
        f"store.sqlite_path={database}",
        "store.heartbeat_s=0.2",
        "store.gateway_timeout_s=1.0",
        "auth.enabled=false",
    )


async def test_kill_9_mid_answer_then_restart(tmp_path: Path) -> None:
    """After kill -9 the user's message is stored, the cut answer is absent (not corrupt),
    and after a restart the conversation takes its next turn."""
    database = tmp_path / "conversations.db"
    process, address = await _serve(database)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = chat_pb2_grpc.ChatServiceStub(channel).Complete(
                chat_pb2.CompleteRequest(message="tell me the alphabet")
            )
            started = await anext(aiter(call))
            await anext(aiter(call))
            process.send_signal(signal.SIGKILL)
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    conversation_id = started.started.conversation_id

    process, address = await _serve(database)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            conversations = conversations_pb2_grpc.ConversationServiceStub(channel)
            page = await conversations.ListMessages(
                cv.ListMessagesRequest(conversation_id=conversation_id)
            )
            assert [("user", "tell me the alphabet")] == [
                (m.role, m.content) for m in page.messages
            ]
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            # The dead gateway's turn holds the conversation until its heartbeat is stale.
            request = chat_pb2.CompleteRequest(message="again", conversation_id=conversation_id)
            codes = []
            for _ in range(50):
                try:
                    events = [e async for e in chat.Complete(request)]
                    break
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
                    await asyncio.sleep(0.1)
            assert {grpc.StatusCode.ABORTED} >= set(codes)
            assert REPLY == "".join(e.delta.text for e in events if e.HasField("delta"))
            page = await conversations.ListMessages(
                cv.ListMessagesRequest(conversation_id=conversation_id)
            )
            assert [
                ("user", "tell me the alphabet"),
                ("user", "again"),
                ("assistant", REPLY),
            ] == [(m.role, m.content) for m in page.messages]
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
