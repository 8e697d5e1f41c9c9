"""ConversationService through the generated stubs: list, read back, rename, delete, isolation."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tokenwire.proto.v1 import chat_pb2
from tokenwire.proto.v1 import conversations_pb2 as cv

from .conftest import REPLY, Device, Gateway


def _answer(events: list[chat_pb2.CompleteResponse]) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def _status(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


async def test_a_conversation_continues_on_a_second_device(gateway: Gateway) -> None:
    """Started on a phone, listed and continued on a laptop: four messages, in order."""
    phone, laptop = gateway.device("alice"), gateway.device("alice")
    first = await phone.complete("Plan a trip to Lisbon")
    conversation_id = first[0].started.conversation_id
    listed = await laptop.conversations.ListConversations(
        cv.ListConversationsRequest(), metadata=laptop.metadata
    )
    assert [conversation_id] == [c.id for c in listed.conversations]
    assert "Plan a trip to Lisbon" == listed.conversations[0].title
    second = await laptop.complete("And Porto?", conversation_id=conversation_id)
    assert conversation_id == second[0].started.conversation_id
    messages = await phone.conversations.ListMessages(
        cv.ListMessagesRequest(conversation_id=conversation_id), metadata=phone.metadata
    )
    assert [
        ("user", "Plan a trip to Lisbon", True),
        ("assistant", REPLY, True),
        ("user", "And Porto?", True),
        ("assistant", REPLY, True),
    ] == [(m.role, m.content, m.complete) for m in messages.messages]
    assert first[0].started.message_id == messages.messages[1].id
    assert first[0].started.turn_id == messages.messages[0].turn_id == messages.messages[1].turn_id
    got = await laptop.conversations.GetConversation(
        cv.GetConversationRequest(conversation_id=conversation_id), metadata=laptop.metadata
    )
    assert (conversation_id, "Plan a trip to Lisbon") == (got.id, got.title)
    assert got.update_time >= got.create_time > 0


async def test_conversations_page_newest_first(gateway: Gateway) -> None:
    """Five conversations in pages of two: 2 + 2 + 1, newest first, none twice."""
    alice = gateway.device("alice")
    ids = [(await alice.complete(f"topic {i}"))[0].started.conversation_id for i in range(5)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await alice.conversations.ListConversations(
            cv.ListConversationsRequest(page_size=2, page_token=token), metadata=alice.metadata
        )
        pages += 1
        seen += [c.id for c in page.conversations]
        token = page.next_page_token
        if not token:
            break
    assert 3 == pages
    assert list(reversed(ids)) == seen


async def test_messages_page_oldest_first(gateway: Gateway) -> None:
    """Three turns' six messages in pages of four: the same order as one read."""
    alice = gateway.device("alice")
    conversation_id = (await alice.complete("one"))[0].started.conversation_id
    for text in ("two", "three"):
        await alice.complete(text, conversation_id=conversation_id)
    first = await alice.conversations.ListMessages(
        cv.ListMessagesRequest(conversation_id=conversation_id, page_size=4),
        metadata=alice.metadata,
    )
    second = await alice.conversations.ListMessages(
        cv.ListMessagesRequest(
            conversation_id=conversation_id, page_size=4, page_token=first.next_page_token
        ),
        metadata=alice.metadata,
    )
    users = [m.content for m in [*first.messages, *second.messages] if m.role == "user"]
    assert (4, 2, "") == (len(first.messages), len(second.messages), second.next_page_token)
    assert ["one", "two", "three"] == users


async def test_bad_page_requests_are_invalid_arguments(gateway: Gateway) -> None:
    """A page token the server did not issue, or a negative size: INVALID_ARGUMENT."""
    alice = gateway.device("alice")
    conversations = alice.conversations
    for request in (
        cv.ListConversationsRequest(page_token="not-a-token"),
        cv.ListConversationsRequest(page_size=-1),
        cv.ListConversationsRequest(page_token="x" * 10_000),
    ):
        call = conversations.ListConversations(request, metadata=alice.metadata)
        assert grpc.StatusCode.INVALID_ARGUMENT == await _status(call)


async def test_rename_and_its_bounds(gateway: Gateway) -> None:
    """A new title is stored and listed; an empty or overlong one is INVALID_ARGUMENT."""
    alice = gateway.device("alice")
    conversation_id = (await alice.complete("hello"))[0].started.conversation_id
    renamed = await alice.conversations.UpdateConversation(
        cv.UpdateConversationRequest(conversation_id=conversation_id, title="Holidays"),
        metadata=alice.metadata,
    )
    assert "Holidays" == renamed.title
    listed = await alice.conversations.ListConversations(
        cv.ListConversationsRequest(), metadata=alice.metadata
    )
    assert ["Holidays"] == [c.title for c in listed.conversations]
    for title in ("", "   ", "t" * 201):
        call = alice.conversations.UpdateConversation(
            cv.UpdateConversationRequest(conversation_id=conversation_id, title=title),
            metadata=alice.metadata,
        )
        assert grpc.StatusCode.INVALID_ARGUMENT == await _status(call)


async def test_delete_takes_the_messages_with_it(gateway: Gateway) -> None:
    """After DeleteConversation: NOT_FOUND to read, list or continue it; gone from the list."""
    alice = gateway.device("alice")
    conversation_id = (await alice.complete("forget me"))[0].started.conversation_id
    await alice.conversations.DeleteConversation(
        cv.DeleteConversationRequest(conversation_id=conversation_id), metadata=alice.metadata
    )
    md = alice.metadata
    for call in (
        alice.conversations.GetConversation(
            cv.GetConversationRequest(conversation_id=conversation_id), metadata=md
        ),
        alice.conversations.ListMessages(
            cv.ListMessagesRequest(conversation_id=conversation_id), metadata=md
        ),
        alice.conversations.DeleteConversation(
            cv.DeleteConversationRequest(conversation_id=conversation_id), metadata=md
        ),
    ):
        assert grpc.StatusCode.NOT_FOUND == await _status(call)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.complete("again", conversation_id=conversation_id)
    assert grpc.StatusCode.NOT_FOUND == caught.value.code()
    listed = await alice.conversations.ListConversations(cv.ListConversationsRequest(), metadata=md)
    assert [] == list(listed.conversations)


async def test_another_users_conversation_is_not_found(gateway: Gateway) -> None:
    """Bob (same tenant) and eve (alice of another tenant) get NOT_FOUND on every call,
    with the same message as for an id that does not exist; alice's data is untouched."""
    alice = gateway.device("alice")
    conversation_id = (await alice.complete("private"))[0].started.conversation_id
    missing = "conv_" + "0" * 32
    for who in ("bob", "eve"):
        other: Device = gateway.device(who)
        md = other.metadata
        for target in (conversation_id, missing):
            details = []
            for call in (
                other.conversations.GetConversation(
                    cv.GetConversationRequest(conversation_id=target), metadata=md
                ),
                other.conversations.ListMessages(
                    cv.ListMessagesRequest(conversation_id=target), metadata=md
                ),
                other.conversations.UpdateConversation(
                    cv.UpdateConversationRequest(conversation_id=target, title="mine"), metadata=md
                ),
                other.conversations.DeleteConversation(
                    cv.DeleteConversationRequest(conversation_id=target), metadata=md
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert grpc.StatusCode.NOT_FOUND == caught.value.code()
                details.append(caught.value.details().replace(target, "ID"))
            assert 1 == len(set(details))
        listed = await other.conversations.ListConversations(
            cv.ListConversationsRequest(), metadata=md
        )
        assert [] == list(listed.conversations)
    got = await alice.conversations.GetConversation(
        cv.GetConversationRequest(conversation_id=conversation_id), metadata=alice.metadata
    )
    assert "private" == got.title


async def test_two_turns_on_one_conversation_never_interleave(gateway: Gateway) -> None:
    """Two devices start a turn on one conversation at once: one answers, the other is
    ABORTED; the history holds exactly one exchange after the first."""
    phone, laptop = gateway.device("alice"), gateway.device("alice")
    conversation_id = (await phone.complete("start"))[0].started.conversation_id
    results = await asyncio.gather(
        phone.complete("from the phone", conversation_id=conversation_id),
        laptop.complete("from the laptop", conversation_id=conversation_id),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    answers = [r for r in results if isinstance(r, list)]
    assert (1, 1) == (len(errors), len(answers))
    assert grpc.StatusCode.ABORTED == errors[0].code()
    assert "turn" in (errors[0].details() or "")
    messages = await phone.conversations.ListMessages(
        cv.ListMessagesRequest(conversation_id=conversation_id), metadata=phone.metadata
    )
    roles = [m.role for m in messages.messages]
    assert ["user", "assistant", "user", "assistant"] == roles
    assert REPLY == _answer(answers[0])
