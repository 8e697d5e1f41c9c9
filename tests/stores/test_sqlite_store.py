"""SQLiteConversationStore: the conversation store contract, on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from tokenwire.errors import ConfigError, InvalidArgumentError, NotFoundError
from tokenwire.stores import (
    BegunTurn,
    ConversationStore,
    SQLiteConversationStore,
    StoreClosedError,
    TurnEnd,
    is_valid_id,
    new_id,
)
from tokenwire.stores.sqlite import MIGRATIONS


class FakeClock:
    """A clock that moves one second forward on every reading."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
async def store() -> AsyncIterator[SQLiteConversationStore]:
    """An open in-memory store with a deterministic clock."""
    s = SQLiteConversationStore(":memory:", clock=FakeClock())
    await s.open()
    yield s
    await s.close()


def _mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def _raw(path: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


async def _add(store: SQLiteConversationStore, conv_id: str, content: str) -> None:
    await store.add_message("alice", conv_id, role="user", content=content, turn_id=new_id("turn"))


async def test_store_satisfies_the_protocol(store: SQLiteConversationStore) -> None:
    """SQLiteConversationStore is a ConversationStore."""
    assert isinstance(store, ConversationStore)


async def test_create_then_get_returns_the_conversation(store: SQLiteConversationStore) -> None:
    """A created conversation reads back identically for its owner."""
    created = await store.create_conversation("alice", title="Trip ideas")

    fetched = await store.get_conversation("alice", created.id)

    assert created == fetched
    assert is_valid_id(created.id, "conv")
    assert (fetched.owner, fetched.title) == ("alice", "Trip ideas")
    assert fetched.created_at == fetched.updated_at


async def test_another_owner_gets_not_found(store: SQLiteConversationStore) -> None:
    """Someone else's conversation is NOT_FOUND for get, add and list alike."""
    conv = await store.create_conversation("alice", title="private")

    with pytest.raises(NotFoundError):
        await store.get_conversation("mallory", conv.id)
    with pytest.raises(NotFoundError):
        await store.add_message("mallory", conv.id, role="user", content="hi", turn_id="t")
    with pytest.raises(NotFoundError):
        await store.list_messages("mallory", conv.id)
    assert await store.list_messages("alice", conv.id) == []


@pytest.mark.parametrize(
    "conversation_id",
    [
        pytest.param(new_id("conv"), id="unknown"),
        pytest.param("", id="empty"),
        pytest.param("not-an-id", id="garbage"),
        pytest.param(new_id("msg"), id="wrong-prefix"),
        pytest.param("conv_" + "g" * 32, id="not-hex"),
        pytest.param("conv_" + "a" * 1000, id="too-long"),
        pytest.param("conv_x' OR '1'='1", id="sql-ish"),
    ],
)
async def test_unknown_or_malformed_id_is_not_found(
    store: SQLiteConversationStore, conversation_id: str
) -> None:
    """Ids that do not exist or are malformed are NOT_FOUND, never INVALID_ARGUMENT."""
    await store.create_conversation("alice", title="exists")

    with pytest.raises(NotFoundError):
        await store.get_conversation("alice", conversation_id)
    with pytest.raises(NotFoundError):
        await store.add_message("alice", conversation_id, role="user", content="x", turn_id="t")
    with pytest.raises(NotFoundError):
        await store.list_messages("alice", conversation_id)


async def test_not_found_message_is_bounded(store: SQLiteConversationStore) -> None:
    """The error echoes at most a short prefix of a huge client-supplied id."""
    with pytest.raises(NotFoundError) as caught:
        await store.get_conversation("alice", "x" * 10_000)

    assert len(caught.value.message) < 200


async def test_messages_list_oldest_first(store: SQLiteConversationStore) -> None:
    """Messages come back in the order they were added, with their fields intact."""
    conv = await store.create_conversation("alice", title="t")
    turn = new_id("turn")
    added = [
        await store.add_message("alice", conv.id, role="system", content="be brief", turn_id=turn),
        await store.add_message("alice", conv.id, role="user", content="hi", turn_id=turn),
        await store.add_message("alice", conv.id, role="assistant", content="hello", turn_id=turn),
    ]

    listed = await store.list_messages("alice", conv.id)

    assert added == listed
    assert [m.role for m in listed] == ["system", "user", "assistant"]
    assert all(is_valid_id(m.id, "msg") for m in listed)


async def test_limit_returns_newest_in_oldest_first_order(store: SQLiteConversationStore) -> None:
    """limit=N gives the newest N messages, still oldest first."""
    conv = await store.create_conversation("alice", title="t")
    for i in range(10):
        await _add(store, conv.id, f"m{i}")

    newest = await store.list_messages("alice", conv.id, limit=3)
    everything = await store.list_messages("alice", conv.id, limit=100)
    none = await store.list_messages("alice", conv.id, limit=0)

    assert [m.content for m in newest] == ["m7", "m8", "m9"]
    assert [f"m{i}" for i in range(10)] == [m.content for m in everything]
    assert none == []


async def test_negative_limit_is_invalid_argument(store: SQLiteConversationStore) -> None:
    """A negative limit is INVALID_ARGUMENT."""
    conv = await store.create_conversation("alice", title="t")

    with pytest.raises(InvalidArgumentError):
        await store.list_messages("alice", conv.id, limit=-1)


async def test_add_message_bumps_updated_at(store: SQLiteConversationStore) -> None:
    """Adding a message moves the conversation's updated_at to the message's time."""
    conv = await store.create_conversation("alice", title="t")

    message = await store.add_message("alice", conv.id, role="user", content="x", turn_id="t")
    after = await store.get_conversation("alice", conv.id)

    assert message.created_at == after.updated_at
    assert after.updated_at > conv.updated_at
    assert conv.created_at == after.created_at


async def test_updated_at_never_moves_backwards() -> None:
    """A clock that steps backwards does not move updated_at backwards."""
    readings = iter([1.0, 100.0, 50.0])  # open() reads the first, for its heartbeat
    async with SQLiteConversationStore(":memory:", clock=lambda: next(readings)) as s:
        conv = await s.create_conversation("alice", title="t")
        await s.add_message("alice", conv.id, role="user", content="x", turn_id="t")

        assert (await s.get_conversation("alice", conv.id)).updated_at == 100.0


async def test_complete_flag_roundtrips(store: SQLiteConversationStore) -> None:
    """complete=False (a cut-short reply) and the default True both read back."""
    conv = await store.create_conversation("alice", title="t")
    await store.add_message("alice", conv.id, role="user", content="q", turn_id="t1")
    await store.add_message(
        "alice", conv.id, role="assistant", content="partial", turn_id="t1", complete=False
    )

    listed = await store.list_messages("alice", conv.id)

    assert [m.complete for m in listed] == [True, False]


async def test_invalid_role_is_invalid_argument(store: SQLiteConversationStore) -> None:
    """A role outside system/user/assistant is INVALID_ARGUMENT and stores nothing."""
    conv = await store.create_conversation("alice", title="t")

    with pytest.raises(InvalidArgumentError):
        await store.add_message("alice", conv.id, role="tool", content="x", turn_id="t")

    assert await store.list_messages("alice", conv.id) == []


async def test_given_message_id_is_kept_and_not_reusable(store: SQLiteConversationStore) -> None:
    """A caller-chosen message id is stored as given; reusing it is INVALID_ARGUMENT."""
    conv = await store.create_conversation("alice", title="t")
    message_id = new_id("msg")

    stored = await store.add_message(
        "alice", conv.id, role="assistant", content="a", turn_id="t", message_id=message_id
    )
    with pytest.raises(InvalidArgumentError):
        await store.add_message(
            "alice", conv.id, role="assistant", content="b", turn_id="t", message_id=message_id
        )
    with pytest.raises(InvalidArgumentError):
        await store.add_message(
            "alice", conv.id, role="assistant", content="c", turn_id="t", message_id="m" * 65
        )

    assert message_id == stored.id
    assert [m.content for m in await store.list_messages("alice", conv.id)] == ["a"]


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    """Conversations and messages written before close() are there after reopening the file."""
    path = tmp_path / "nested" / "dir" / "conversations.db"
    async with SQLiteConversationStore(path) as first:
        conv = await first.create_conversation("alice", title="durable")
        written = await first.add_message(
            "alice", conv.id, role="user", content="remember me", turn_id="t"
        )

    async with SQLiteConversationStore(path) as second:
        assert (await second.get_conversation("alice", conv.id)).title == "durable"
        assert [written] == await second.list_messages("alice", conv.id)
    assert _raw(path, "PRAGMA journal_mode") == [("wal",)]


async def test_migrations_are_idempotent(tmp_path: Path) -> None:
    """Opening the same file again applies no migration twice and keeps the data."""
    path = tmp_path / "conversations.db"
    async with SQLiteConversationStore(path) as first:
        await first.open()  # a second open() on one store is a no-op
        conv = await first.create_conversation("alice", title="t")

    async with SQLiteConversationStore(path) as second:
        assert conv == await second.get_conversation("alice", conv.id)

    assert [(len(MIGRATIONS),)] == _raw(path, "PRAGMA user_version")


async def test_failed_migration_rolls_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration that fails part-way leaves no trace and the version unchanged."""
    path = tmp_path / "conversations.db"
    broken = ("CREATE TABLE half_done (x INTEGER)", "THIS IS NOT SQL")
    monkeypatch.setattr("tokenwire.stores.sqlite.MIGRATIONS", (*MIGRATIONS, broken))

    with pytest.raises(sqlite3.OperationalError):
        await SQLiteConversationStore(path).open()

    assert _raw(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert _raw(path, "SELECT name FROM sqlite_master WHERE name = 'half_done'") == []


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file migrated by a newer release fails open() with a ConfigError."""
    path = tmp_path / "conversations.db"
    async with SQLiteConversationStore(path):
        pass
    _raw(path, f"PRAGMA user_version = {len(MIGRATIONS) + 1}")

    newer = SQLiteConversationStore(path)
    with pytest.raises(ConfigError):
        await newer.open()
    with pytest.raises(StoreClosedError):
        await newer.create_conversation("alice", title="t")


async def test_concurrent_adds_get_distinct_increasing_seq(tmp_path: Path) -> None:
    """Many tasks adding to one conversation at once all land, with seq 1..N."""
    path = tmp_path / "conversations.db"
    count = 50
    async with SQLiteConversationStore(path) as s:
        conv = await s.create_conversation("alice", title="busy")
        await asyncio.gather(*(_add(s, conv.id, f"m{i}") for i in range(count)))
        listed = await s.list_messages("alice", conv.id)

    rows = _raw(path, "SELECT seq, id FROM messages ORDER BY seq")
    assert list(range(1, count + 1)) == [seq for seq, _ in rows]
    assert [m.id for m in listed] == [message_id for _, message_id in rows]
    assert {f"m{i}" for i in range(count)} == {m.content for m in listed}


async def test_calls_outside_open_raise_store_closed() -> None:
    """Calls before open() or after close() raise StoreClosedError; close() is idempotent."""
    s = SQLiteConversationStore(":memory:")
    with pytest.raises(StoreClosedError, match="not open"):
        await s.create_conversation("alice", title="t")

    await s.open()
    conv = await s.create_conversation("alice", title="t")
    await s.close()
    await s.close()

    with pytest.raises(StoreClosedError, match="closed"):
        await s.get_conversation("alice", conv.id)
    with pytest.raises(StoreClosedError):
        await s.open()


async def test_close_finishes_calls_already_made(tmp_path: Path) -> None:
    """Writes started before close() are committed, not dropped."""
    path = tmp_path / "conversations.db"
    s = SQLiteConversationStore(path)
    await s.open()
    conv = await s.create_conversation("alice", title="t")

    pending = [asyncio.create_task(_add(s, conv.id, f"m{i}")) for i in range(5)]
    await asyncio.sleep(0)  # let each task queue its write
    await s.close()
    await asyncio.gather(*pending)

    assert _raw(path, "SELECT COUNT(*) FROM messages") == [(5,)]


def test_new_id_shape() -> None:
    """new_id mints distinct prefixed ids that is_valid_id accepts only for their prefix."""
    first, second = new_id("conv"), new_id("conv")

    assert first != second
    assert first.startswith("conv_")
    assert is_valid_id(first, "conv")
    assert not is_valid_id(first, "msg")
    with pytest.raises(ValueError, match="prefix"):
        new_id("Bad Prefix")


@pytest.mark.usefixtures("umask_022")
async def test_the_database_and_its_folders_are_private(tmp_path: Path) -> None:
    """New folders are 0700; the database and its -wal and -shm files are 0600."""
    path = tmp_path / "data" / "tenants" / "conversations.db"
    async with SQLiteConversationStore(path) as s:
        await s.create_conversation("alice", title="private")
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        assert ["0o600", "0o600", "0o600"] == [_mode(file) for file in files]
    assert ["0o700", "0o700"] == [_mode(path.parent.parent), _mode(path.parent)]


@pytest.mark.usefixtures("umask_022")
async def test_a_readable_database_is_made_private_on_open(tmp_path: Path) -> None:
    """A database file an older release left 0644 is 0600 once opened; its folder is kept."""
    path = tmp_path / "conversations.db"
    path.touch(mode=0o644)
    folder_mode = _mode(tmp_path)

    async with SQLiteConversationStore(path) as s:
        await s.create_conversation("alice", title="private")

    assert ("0o600", folder_mode) == (_mode(path), _mode(tmp_path))


async def test_begin_turn_creates_the_conversation_and_stores_the_message(
    store: SQLiteConversationStore,
) -> None:
    """With no conversation id, one write makes the conversation and its first message."""
    begun = await store.begin_turn(
        "alice", "", title="Hi there", content="Hi", turn_id="t1", answer_id="a1", model="m"
    )
    conversation_id = begun.turn.conversation_id
    conversation = await store.get_conversation("alice", conversation_id)
    messages = await store.list_messages("alice", conversation_id)
    assert "Hi there" == conversation.title
    assert [("user", "Hi", "t1", True)] == [
        (m.role, m.content, m.turn_id, m.complete) for m in messages
    ]


async def test_begin_turn_continues_only_the_owner_s_conversation(
    store: SQLiteConversationStore,
) -> None:
    """A second turn appends to the conversation; another owner's id is NOT_FOUND."""

    async def begin(owner: str, conversation_id: str, content: str) -> BegunTurn:
        return await store.begin_turn(
            owner, conversation_id, title="t", content=content, turn_id=new_id("turn"),
            answer_id=new_id("msg"), model="m",
        )  # fmt: skip

    first = await begin("alice", "", "one")
    conversation_id = first.turn.conversation_id
    await store.finish_turn("alice", conversation_id, first.turn.turn_id, first.turn.answer_id,
                            TurnEnd("", True, "stop"))  # fmt: skip
    await begin("alice", conversation_id, "two")
    with pytest.raises(NotFoundError):
        await begin("bob", conversation_id, "x")
    with pytest.raises(NotFoundError):
        await begin("alice", "conv_nope", "x")
    contents = [m.content for m in await store.list_messages("alice", conversation_id)]
    assert ["one", "", "two"] == contents


async def test_checkpoints_run_in_the_background_of_a_busy_file(tmp_path: Path) -> None:
    """Past the checkpoint interval the store goes on answering; the WAL is copied back."""
    store = SQLiteConversationStore(tmp_path / "c.db")
    await store.open()
    try:
        conversation = await store.create_conversation("alice", title="t")
        for i in range(1100):
            await _add(store, conversation.id, str(i))
        messages = await store.list_messages("alice", conversation.id)
    finally:
        await store.close()
    assert 1100 == len(messages)
    with closing(sqlite3.connect(tmp_path / "c.db")) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
    assert 1100 == count


async def test_a_closed_store_leaves_no_gateway_behind(tmp_path: Path) -> None:
    """open() registers the store's gateway and close() removes it."""
    path = tmp_path / "c.db"
    async with SQLiteConversationStore(path) as s:
        during = _raw(path, "SELECT id FROM gateways")
        gateway_id = s.gateway_id

    assert ([(gateway_id,)], []) == (during, _raw(path, "SELECT id FROM gateways"))


async def test_migration_2_keeps_the_conversations_of_a_version_1_file(tmp_path: Path) -> None:
    """A file made by migration 1 alone opens with its conversations and messages intact."""
    path = tmp_path / "c.db"
    with closing(sqlite3.connect(path)) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO conversations VALUES ('conv_' || hex(randomblob(16)), 'alice',"
                     " 'old', 1.0, 2.0)")  # fmt: skip
        conn.execute("PRAGMA user_version = 1")
        conn.commit()

    async with SQLiteConversationStore(path) as s:
        page = await s.list_conversations("alice", page_size=5)

    assert (["old"], [(len(MIGRATIONS),)]) == (
        [c.title for c in page.items], _raw(path, "PRAGMA user_version"),
    )  # fmt: skip


async def test_an_open_store_beats_on_its_own(tmp_path: Path) -> None:
    """While open, the store records a fresh heartbeat every heartbeat_s seconds."""
    path = tmp_path / "c.db"
    clock = FakeClock()
    async with SQLiteConversationStore(path, clock=clock, heartbeat_s=0.01) as s:
        first = _raw(path, "SELECT heartbeat_at FROM gateways")
        await asyncio.sleep(0.05)
        later = _raw(path, "SELECT heartbeat_at FROM gateways")
        assert s.gateway_id == _raw(path, "SELECT id FROM gateways")[0][0]

    assert True is (later[0][0] > first[0][0])
