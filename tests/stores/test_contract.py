"""The turn-level conversation store contract, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.stores.conftest import GATEWAY_TIMEOUT_S, IDEMPOTENCY_TTL_S, OTHER, OWNER, Backend
from tokenwire.errors import InvalidArgumentError, NotFoundError
from tokenwire.stores import (
    MAX_TITLE_BYTES,
    BegunTurn,
    ConversationBusyError,
    ConversationStore,
    StoredMessage,
    TurnEnd,
    TurnRecord,
    new_id,
)
from tokenwire.stores.cursors import conversations_cursor, messages_cursor


async def begin(
    store: Any, conversation_id: str = "", *, content: str = "Hi", key: str = "", owner: str = OWNER
) -> BegunTurn:
    """Begin a turn with fresh ids."""
    begun: BegunTurn = await store.begin_turn(
        owner,
        conversation_id,
        title="A title",
        content=content,
        turn_id=new_id("turn"),
        answer_id=new_id("msg"),
        model="smollm2",
        idempotency_key=key,
    )
    return begun


async def finish(store: Any, begun: BegunTurn, answer: str = "Hello!", **fields: Any) -> bool:
    """Finish ``begun`` with ``answer``."""
    end = TurnEnd(answer=answer, complete=fields.pop("complete", True),
                  finish_reason=fields.pop("finish_reason", "stop"), **fields)  # fmt: skip
    turn = begun.turn
    done: bool = await store.finish_turn(
        OWNER, turn.conversation_id, turn.turn_id, turn.answer_id, end
    )
    return done


async def test_store_satisfies_the_protocol(store: Any) -> None:
    """Both stores are ConversationStores."""
    assert isinstance(store, ConversationStore)


async def test_begin_and_finish_store_the_turn_and_its_answer(store: Any) -> None:
    """A new conversation's turn stores its user message, then its answer, in order."""
    begun = await begin(store, content="Hi there")
    turn = begun.turn

    done = await finish(store, begun, "Hello!", prompt_tokens=5, completion_tokens=2)

    conversation = await store.get_conversation(OWNER, turn.conversation_id)
    history = await store.list_messages(OWNER, turn.conversation_id)
    assert (True, False, True, "A title") == (
        begun.created_conversation, begun.replayed, turn.running, conversation.title,
    )  # fmt: skip
    assert StoredMessage(
        turn.user_message_id, turn.conversation_id, "user", "Hi there", turn.created_at,
        turn.turn_id, True, 1,
    ) == begun.user_message  # fmt: skip
    assert True is done
    assert [("user", "Hi there", True, 1), ("assistant", "Hello!", True, 2)] == [
        (m.role, m.content, m.complete, m.seq) for m in history
    ]
    assert [turn.user_message_id, turn.answer_id] == [m.id for m in history]
    assert TurnRecord(
        turn.turn_id, turn.conversation_id, turn.user_message_id, turn.answer_id, "smollm2",
        "", False, "Hello!", True, "stop", "", 5, 2, turn.created_at,
    ) == await store.get_turn(OWNER, turn.turn_id)  # fmt: skip


async def test_an_answer_cut_short_is_stored_exactly_even_empty(store: Any) -> None:
    """An incomplete answer keeps its exact text (empty included) and its filter category."""
    first = await begin(store)
    await finish(store, first, "", complete=False, finish_reason="cancelled")
    second = await begin(store, first.turn.conversation_id)
    await finish(store, second, "  partial ", complete=False, finish_reason="content_filter",
                 filter_category="violence")  # fmt: skip

    history = await store.list_messages(OWNER, first.turn.conversation_id)
    record = await store.get_turn(OWNER, second.turn.turn_id)

    assert [("", False), ("  partial ", False)] == [
        (m.content, m.complete) for m in history if m.role == "assistant"
    ]
    assert ("content_filter", "violence", False) == (
        record.finish_reason, record.filter_category, record.answer_complete,
    )  # fmt: skip


async def test_a_second_gateway_continues_the_conversation(backend: Backend, store: Any) -> None:
    """A conversation begun on one store instance takes its next turn on another."""
    other = await backend.open_store()
    first = await begin(store, content="one")
    await finish(store, first, "answer one")

    second = await begin(other, first.turn.conversation_id, content="two")
    await finish(other, second, "answer two")

    assert ["one", "answer one", "two", "answer two"] == [
        m.content for m in await store.list_messages(OWNER, first.turn.conversation_id)
    ]
    assert (False, [1, 2, 3, 4]) == (
        second.created_conversation,
        [m.seq for m in await other.list_messages(OWNER, first.turn.conversation_id)],
    )


async def test_conversations_list_newest_first_in_pages(store: Any) -> None:
    """Seven conversations come back newest first in pages of 3, 3 and 1."""
    created = [await store.create_conversation(OWNER, title=f"c{i}") for i in range(7)]
    await store.create_conversation(OTHER, title="not alice's")

    first = await store.list_conversations(OWNER, page_size=3)
    second = await store.list_conversations(OWNER, page_size=3, cursor=first.next_cursor)
    third = await store.list_conversations(OWNER, page_size=3, cursor=second.next_cursor)

    assert [c.id for c in reversed(created)] == [
        c.id for page in (first, second, third) for c in page.items
    ]
    assert ([3, 3, 1], "") == ([len(p.items) for p in (first, second, third)], third.next_cursor)
    assert "" != second.next_cursor


async def test_an_update_moves_a_conversation_to_the_front(store: Any) -> None:
    """A conversation that takes a turn is listed first; a rename moves it too."""
    old = await begin(store)
    await finish(store, old)
    new = await store.create_conversation(OWNER, title="newer")

    before = await store.list_conversations(OWNER, page_size=10)
    await finish(store, await begin(store, old.turn.conversation_id))
    after_turn = await store.list_conversations(OWNER, page_size=10)
    await store.rename_conversation(OWNER, new.id, "renamed")
    after_rename = await store.list_conversations(OWNER, page_size=10)

    assert [new.id, old.turn.conversation_id] == [c.id for c in before.items]
    assert [old.turn.conversation_id, new.id] == [c.id for c in after_turn.items]
    assert [new.id, old.turn.conversation_id] == [c.id for c in after_rename.items]


async def test_messages_come_in_pages_oldest_first(store: Any) -> None:
    """Five messages come back oldest first in pages of 2, 2 and 1, with their seq."""
    conversation = await store.create_conversation(OWNER, title="t")
    for i in range(5):
        await store.add_message(OWNER, conversation.id, role="user", content=f"m{i}", turn_id="t")

    pages = [await store.page_messages(OWNER, conversation.id, page_size=2)]
    while pages[-1].next_cursor:
        pages.append(await store.page_messages(OWNER, conversation.id, page_size=2,
                                               cursor=pages[-1].next_cursor))  # fmt: skip

    assert [[("m0", 1), ("m1", 2)], [("m2", 3), ("m3", 4)], [("m4", 5)]] == [
        [(m.content, m.seq) for m in page.items] for page in pages
    ]


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param("v1.!!!not-base64", id="not-base64"),
        pytest.param("v1.bnVsbA", id="json-null"),
        pytest.param(messages_cursor(conversation_id="conv_x", seq=3), id="other-listing"),
        pytest.param("v1." + "A" * 600, id="too-long"),
    ],
)
async def test_a_bad_conversations_cursor_is_invalid_argument(store: Any, cursor: str) -> None:
    """A page token the conversation listing did not make is INVALID_ARGUMENT."""
    with pytest.raises(InvalidArgumentError, match="page_token is not valid"):
        await store.list_conversations(OWNER, page_size=3, cursor=cursor)


async def test_a_bad_messages_cursor_or_page_size_is_invalid_argument(store: Any) -> None:
    """A conversations cursor, another conversation's cursor, or page_size 0 are refused."""
    conversation = await store.create_conversation(OWNER, title="t")
    other = await store.create_conversation(OWNER, title="other")
    foreign_kind = conversations_cursor(updated_at=1.0, conversation_id=conversation.id)
    foreign_conversation = messages_cursor(conversation_id=other.id, seq=1)

    for cursor in (foreign_kind, foreign_conversation, "v1.e30"):
        with pytest.raises(InvalidArgumentError, match="page_token is not valid"):
            await store.page_messages(OWNER, conversation.id, page_size=2, cursor=cursor)
    with pytest.raises(InvalidArgumentError, match="page_size"):
        await store.page_messages(OWNER, conversation.id, page_size=0)
    with pytest.raises(InvalidArgumentError, match="page_size"):
        await store.list_conversations(OWNER, page_size=-1)


async def test_rename_sets_a_stripped_title_and_bumps_updated_at(store: Any) -> None:
    """A rename keeps the title without surrounding spaces and moves updated_at forward."""
    conversation = await store.create_conversation(OWNER, title="old")

    renamed = await store.rename_conversation(OWNER, conversation.id, "  Trip to Lyon \n")

    assert ("Trip to Lyon", True) == (renamed.title, renamed.updated_at > conversation.updated_at)
    assert renamed == await store.get_conversation(OWNER, conversation.id)


@pytest.mark.parametrize(
    "title",
    [
        pytest.param("", id="empty"),
        pytest.param(" \t\n", id="blank"),
        pytest.param("é" * (MAX_TITLE_BYTES // 2 + 1), id="too-many-bytes"),
    ],
)
async def test_a_bad_title_is_invalid_argument(store: Any, title: str) -> None:
    """An empty title, or one over MAX_TITLE_BYTES bytes of UTF-8, is refused."""
    conversation = await store.create_conversation(OWNER, title="old")

    with pytest.raises(InvalidArgumentError, match="title"):
        await store.rename_conversation(OWNER, conversation.id, title)

    assert "old" == (await store.get_conversation(OWNER, conversation.id)).title


async def test_a_title_of_exactly_max_bytes_is_kept(store: Any) -> None:
    """A title of exactly MAX_TITLE_BYTES bytes is accepted whole."""
    conversation = await store.create_conversation(OWNER, title="old")
    title = "é" * (MAX_TITLE_BYTES // 2)

    assert title == (await store.rename_conversation(OWNER, conversation.id, title)).title


async def test_delete_removes_the_conversation_its_messages_and_turns(
    backend: Backend, store: Any
) -> None:
    """After a delete, no message or turn row is left, and every read is NOT_FOUND."""
    begun = await begin(store)
    await finish(store, begun)
    kept = await begin(store)
    conversation_id = begun.turn.conversation_id

    await store.delete_conversation(OWNER, conversation_id)

    where = f"conversation_id = '{conversation_id}'"
    assert (0, 0) == (await backend.count("messages", where), await backend.count("turns", where))
    assert (1, 1) == (await backend.count("turns"), await backend.count("conversations"))
    for read in (
        store.get_conversation(OWNER, conversation_id),
        store.list_messages(OWNER, conversation_id),
        store.get_turn(OWNER, begun.turn.turn_id),
        store.delete_conversation(OWNER, conversation_id),
    ):
        with pytest.raises(NotFoundError):
            await read
    assert kept.turn == await store.get_turn(OWNER, kept.turn.turn_id)


async def test_another_owner_sees_nothing(store: Any) -> None:
    """Someone else's conversation and turn are NOT_FOUND exactly like missing ones."""
    begun = await begin(store)
    missing_conversation, missing_turn = new_id("conv"), new_id("turn")

    async def error_of(call: Any) -> str:
        with pytest.raises(NotFoundError) as caught:
            await call
        return caught.value.message.replace(begun.turn.conversation_id, "ID").replace(
            missing_conversation, "ID"
        )

    for conversation_id in (begun.turn.conversation_id, missing_conversation):
        messages = {
            await error_of(store.get_conversation(OTHER, conversation_id)),
            await error_of(begin(store, conversation_id, owner=OTHER)),
            await error_of(store.rename_conversation(OTHER, conversation_id, "mine")),
            await error_of(store.page_messages(OTHER, conversation_id, page_size=5)),
            await error_of(store.delete_conversation(OTHER, conversation_id)),
        }
        assert {"conversation 'ID' not found"} == messages
    with pytest.raises(NotFoundError, match="turn"):
        await store.get_turn(OTHER, begun.turn.turn_id)
    with pytest.raises(NotFoundError, match="turn"):
        await store.get_turn(OWNER, missing_turn)
    assert [] == (await store.list_conversations(OTHER, page_size=10)).items
    assert False is await store.finish_turn(
        OTHER, begun.turn.conversation_id, begun.turn.turn_id, begun.turn.answer_id,
        TurnEnd("stolen", True, "stop"),
    )  # fmt: skip
    assert begun.turn == await store.get_turn(OWNER, begun.turn.turn_id)


async def test_an_idempotency_key_replays_the_turn_running_then_done(
    backend: Backend, store: Any
) -> None:
    """The same key gives back the same turn, running and then done, storing nothing new."""
    begun = await begin(store, content="once", key="key-1")

    while_running = await begin(store, new_id("conv"), content="twice", key="key-1")
    await finish(store, begun, "the answer")
    after = await begin(store, "", content="thrice", key="key-1")

    assert (True, begun.turn, begun.user_message) == (
        while_running.replayed, while_running.turn, while_running.user_message,
    )  # fmt: skip
    assert (True, False, "the answer", True) == (
        after.replayed, after.turn.running, after.turn.answer, after.turn.answer_complete,
    )  # fmt: skip
    assert (begun.turn.turn_id, begun.user_message) == (after.turn.turn_id, after.user_message)
    assert (1, 1, 2) == (
        await backend.count("conversations"), await backend.count("turns"),
        await backend.count("messages"),
    )  # fmt: skip


async def test_keys_are_per_owner(store: Any) -> None:
    """Another owner's identical key starts a turn of its own."""
    mine = await begin(store, key="shared-key")

    theirs = await begin(store, key="shared-key", owner=OTHER)

    assert (False, True) == (theirs.replayed, theirs.turn.turn_id != mine.turn.turn_id)


async def test_an_expired_key_starts_a_new_turn(backend: Backend, store: Any) -> None:
    """Past the idempotency TTL the key no longer replays: a new turn begins."""
    first = await begin(store, key="key-1")
    await finish(store, first)

    backend.clock.advance(IDEMPOTENCY_TTL_S + 1)
    await store.beat()
    again = await begin(store, first.turn.conversation_id, content="again", key="key-1")

    assert (False, True, "key-1") == (
        again.replayed, again.turn.running, again.turn.idempotency_key,
    )  # fmt: skip
    assert "" == (await store.get_turn(OWNER, first.turn.turn_id)).idempotency_key
    assert again.turn == (await begin(store, "", key="key-1")).turn


async def test_one_turn_at_a_time_across_gateways(backend: Backend, store: Any) -> None:
    """Five turns begun at once on one conversation from two gateways: one wins, four are
    ABORTED naming the running turn."""
    other = await backend.open_store()
    first = await begin(store)
    await finish(store, first)
    conversation_id = first.turn.conversation_id

    results = await asyncio.gather(
        *(begin(s, conversation_id) for s in (store, other, store, other, store)),
        return_exceptions=True,
    )

    won = [r for r in results if isinstance(r, BegunTurn)]
    busy = [r for r in results if isinstance(r, ConversationBusyError)]
    assert (1, 4) == (len(won), len(busy))
    assert all(won[0].turn.turn_id in str(error) for error in busy)
    assert 3 == len(await store.list_messages(OWNER, conversation_id))


async def test_a_closed_gateways_turn_is_ended_and_the_conversation_goes_on(
    backend: Backend, store: Any
) -> None:
    """A turn left running by a gateway that closed ends with 'error' at the next turn."""
    survivor = await backend.open_store()
    orphan = await begin(store)
    await store.close()

    next_turn = await begin(survivor, orphan.turn.conversation_id, content="next")
    ended = await survivor.get_turn(OWNER, orphan.turn.turn_id)

    assert (False, "error", "", False) == (
        ended.running, ended.finish_reason, ended.answer, ended.answer_complete,
    )  # fmt: skip
    assert True is next_turn.turn.running
    assert ["Hi", "next"] == [
        m.content for m in await survivor.list_messages(OWNER, orphan.turn.conversation_id)
    ]


async def test_a_silent_gateways_turn_is_dead_after_the_timeout(
    backend: Backend, store: Any
) -> None:
    """A gateway that stops beating holds its turn until gateway_timeout_s, then loses it."""
    watcher = await backend.open_store()
    stalled = await begin(store, key="key-1")

    backend.clock.advance(GATEWAY_TIMEOUT_S / 2)
    with pytest.raises(ConversationBusyError):
        await begin(watcher, stalled.turn.conversation_id)
    backend.clock.advance(GATEWAY_TIMEOUT_S)
    await watcher.beat()  # the watcher lives on; the first gateway stays silent
    seen = await watcher.get_turn(OWNER, stalled.turn.turn_id)
    replay = await begin(watcher, key="key-1")
    next_turn = await begin(watcher, stalled.turn.conversation_id)

    assert (False, "error") == (seen.running, seen.finish_reason)
    assert seen == replay.turn
    assert False is await finish(store, stalled, "too late")
    assert True is await finish(watcher, next_turn, "on time")
    assert ["Hi", "Hi", "on time"] == [
        m.content for m in await watcher.list_messages(OWNER, stalled.turn.conversation_id)
    ]


async def test_a_running_turn_reads_as_running_while_its_gateway_beats(
    backend: Backend, store: Any
) -> None:
    """A turn whose gateway beats stays running, however much time has passed."""
    watcher = await backend.open_store()
    begun = await begin(store)

    backend.clock.advance(GATEWAY_TIMEOUT_S * 3)
    await store.beat()

    assert begun.turn == await watcher.get_turn(OWNER, begun.turn.turn_id)


async def test_finishing_a_turn_of_a_deleted_conversation_stores_nothing(
    backend: Backend, store: Any
) -> None:
    """finish_turn after its conversation was deleted is False and leaves no row."""
    begun = await begin(store)
    await store.delete_conversation(OWNER, begun.turn.conversation_id)

    assert False is await finish(store, begun)
    assert (0, 0) == (await backend.count("messages"), await backend.count("turns"))


async def test_finishing_twice_stores_one_answer(store: Any) -> None:
    """A second finish_turn of the same turn is False and changes nothing."""
    begun = await begin(store)

    assert [True, False] == [await finish(store, begun, "one"), await finish(store, begun, "two")]
    assert "one" == (await store.get_turn(OWNER, begun.turn.turn_id)).answer


async def test_discard_removes_an_orphan_new_conversation(backend: Backend, store: Any) -> None:
    """Discarding the turn that created a conversation removes both, and frees the key."""
    begun = await begin(store, key="key-1")

    await store.discard_turn(OWNER, begun.turn.conversation_id, begun.turn.turn_id)
    await store.discard_turn(OWNER, begun.turn.conversation_id, begun.turn.turn_id)

    with pytest.raises(NotFoundError):
        await store.get_conversation(OWNER, begun.turn.conversation_id)
    assert (0, 0, 0) == (
        await backend.count("conversations"), await backend.count("messages"),
        await backend.count("turns"),
    )  # fmt: skip
    assert False is (await begin(store, key="key-1")).replayed


async def test_discard_in_an_existing_conversation_keeps_it(store: Any) -> None:
    """Discarding a later turn removes only its message; a done turn is not discarded."""
    first = await begin(store, content="one")
    await finish(store, first, "answer")
    second = await begin(store, first.turn.conversation_id, content="two")
    conversation_id = first.turn.conversation_id

    await store.discard_turn(OWNER, conversation_id, second.turn.turn_id)
    await store.discard_turn(OWNER, conversation_id, first.turn.turn_id)
    third = await begin(store, conversation_id, content="three")

    assert [("one", 1), ("answer", 2), ("three", 3)] == [
        (m.content, m.seq) for m in await store.list_messages(OWNER, conversation_id)
    ]
    assert True is third.turn.running
    with pytest.raises(NotFoundError):
        await store.get_turn(OWNER, second.turn.turn_id)


async def test_a_reused_turn_id_is_invalid_argument(store: Any) -> None:
    """begin_turn with a turn_id already stored is INVALID_ARGUMENT and stores nothing."""
    begun = await begin(store)
    await finish(store, begun)

    with pytest.raises(InvalidArgumentError, match="turn_id"):
        await store.begin_turn(
            OWNER, "", title="t", content="x", turn_id=begun.turn.turn_id,
            answer_id=new_id("msg"), model="m",
        )  # fmt: skip

    assert 1 == len((await store.list_conversations(OWNER, page_size=10)).items)


async def test_one_key_begun_at_once_on_two_gateways_stores_one_turn(
    backend: Backend, store: Any
) -> None:
    """The same new key sent to two gateways at once begins one turn; the other replays it."""
    other = await backend.open_store()

    results = await asyncio.gather(begin(store, key="key-1"), begin(other, key="key-1"))

    assert ([False, True], 1) == (
        sorted(r.replayed for r in results), len({r.turn.turn_id for r in results}),
    )  # fmt: skip
    assert (1, 1, 1) == (
        await backend.count("conversations"), await backend.count("turns"),
        await backend.count("messages"),
    )  # fmt: skip
