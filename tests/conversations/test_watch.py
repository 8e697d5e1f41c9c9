"""WatchConversation: another device's turn, live and in order."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tokenwire.proto.v1 import chat_pb2
from tokenwire.proto.v1 import conversations_pb2 as cv

from .conftest import REPLY, Device, Gateway


async def _watch_one_turn(
    watcher: Device, conversation_id: str
) -> list[cv.WatchConversationResponse]:
    call = watcher.conversations.WatchConversation(
        cv.WatchConversationRequest(conversation_id=conversation_id), metadata=watcher.metadata
    )
    seen = []
    async for event in call:
        seen.append(event)
        if event.HasField("finished"):
            break
    call.cancel()
    return seen


async def test_a_watcher_sees_another_devices_turn_live(gateway: Gateway) -> None:
    """The laptop watches; the phone's turn arrives there as its user message, the deltas
    (the whole answer, in order), then its end, under the phone's turn id."""
    phone, laptop = gateway.device("alice"), gateway.device("alice")
    conversation_id = (await phone.complete("first"))[0].started.conversation_id
    watching = asyncio.ensure_future(_watch_one_turn(laptop, conversation_id))
    await asyncio.sleep(0.1)  # subscribed
    events = await phone.complete("second", conversation_id=conversation_id)
    seen = await asyncio.wait_for(watching, 10)
    turn_id = events[0].started.turn_id
    assert {turn_id} == {e.turn_id for e in seen}
    assert "second" == seen[0].turn.user_message.content
    assert events[0].started == seen[0].turn.started
    assert REPLY == "".join(e.delta.text for e in seen if e.HasField("delta"))
    assert chat_pb2.FINISH_REASON_STOP == seen[-1].finished.finish_reason


async def test_watching_someone_elses_conversation_is_not_found(gateway: Gateway) -> None:
    """Bob cannot follow alice's conversation: NOT_FOUND before any event."""
    alice, bob = gateway.device("alice"), gateway.device("bob")
    conversation_id = (await alice.complete("private"))[0].started.conversation_id
    call = bob.conversations.WatchConversation(
        cv.WatchConversationRequest(conversation_id=conversation_id), metadata=bob.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await anext(aiter(call))
    assert grpc.StatusCode.NOT_FOUND == caught.value.code()
