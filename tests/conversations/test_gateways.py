"""Two gateway processes on one database and one Redis: a watcher and a resumed turn on
the second see the first's turn live, and nothing is generated twice."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.conftest import spawn_server
from tokenwire.live.redis_bus import RedisLiveBus
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc, conversations_pb2_grpc
from tokenwire.proto.v1 import conversations_pb2 as cv
from tokenwire.stores import SQLiteConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

REPLY_A = "Gateway A answers this one, slowly and in order."
REPLY_B = "B"


@dataclass
class Pair:
    """Gateway A in this process, gateway B in its own, sharing the database and Redis."""

    a: RunningServer
    backend_a: FakeBackend
    b: grpc.aio.Channel


@pytest.fixture
async def pair(tmp_path: Path, redis_url: str) -> AsyncIterator[Pair]:
    """Both gateways up, auth off (one shared anonymous user), live events through Redis."""
    database = tmp_path / "conversations.db"
    process, address = await spawn_server(
        f"backend.options=reply={REPLY_B}",
        f"store.sqlite_path={database}",
        "store.live=redis",
        f"store.live_redis_url={redis_url}",
        "auth.enabled=false",
    )
    try:
        backend = FakeBackend(reply=REPLY_A, token_delay_s=0.02)
        async with (
            running_server(
                backend,
                config_for_tests(),
                store=SQLiteConversationStore(database),
                live=RedisLiveBus(redis_url),
            ) as a,
            grpc.aio.insecure_channel(address) as b,
        ):
            yield Pair(a, backend, b)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)


async def test_a_watcher_on_another_gateway_sees_the_turn_live(pair: Pair) -> None:
    """Watching on B, a turn on A arrives as its user message, every delta in order, its end."""
    first = [e async for e in pair.a.chat.Complete(chat_pb2.CompleteRequest(message="hello"))]
    conversation_id = first[0].started.conversation_id
    watch = conversations_pb2_grpc.ConversationServiceStub(pair.b).WatchConversation(
        cv.WatchConversationRequest(conversation_id=conversation_id)
    )
    seen: list[cv.WatchConversationResponse] = []

    async def collect() -> None:
        async for event in watch:
            seen.append(event)
            if event.HasField("finished"):
                return

    watching = asyncio.ensure_future(collect())
    await asyncio.sleep(0.3)  # subscribed
    request = chat_pb2.CompleteRequest(message="tell me more", conversation_id=conversation_id)
    events = [e async for e in pair.a.chat.Complete(request)]
    await asyncio.wait_for(watching, 20)
    watch.cancel()
    assert "tell me more" == seen[0].turn.user_message.content
    assert events[0].started == seen[0].turn.started
    deltas = [e.delta.text for e in seen if e.HasField("delta")]
    assert REPLY_A == "".join(deltas)
    assert len(deltas) > 1  # streamed as it came, not stored and sent at the end
    assert chat_pb2.FINISH_REASON_STOP == seen[-1].finished.finish_reason


async def test_a_turn_dropped_on_one_gateway_resumes_on_the_other(pair: Pair) -> None:
    """A keyed turn cut off on A is resumed through B: A's whole answer, once; B never
    generates (its engine would answer "B")."""
    call = pair.a.chat.Complete(chat_pb2.CompleteRequest(message="story", idempotency_key="k"))
    started = await anext(aiter(call))
    await anext(aiter(call))
    call.cancel()  # the phone lost its connection to A
    resumed = [
        e
        async for e in chat_pb2_grpc.ChatServiceStub(pair.b).Complete(
            chat_pb2.CompleteRequest(message="story", idempotency_key="k")
        )
    ]
    assert started.started == resumed[0].started
    assert REPLY_A == "".join(e.delta.text for e in resumed if e.HasField("delta"))
    assert chat_pb2.FINISH_REASON_STOP == resumed[-1].finished.finish_reason
    assert 1 == len(pair.backend_a.requests)
    page = await conversations_pb2_grpc.ConversationServiceStub(pair.b).ListMessages(
        cv.ListMessagesRequest(conversation_id=started.started.conversation_id)
    )
    assert [("user", "story"), ("assistant", REPLY_A)] == [
        (m.role, m.content) for m in page.messages
    ]
