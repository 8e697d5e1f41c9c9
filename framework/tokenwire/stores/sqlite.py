"""The embedded conversation store: one SQLite file, stdlib :mod:`sqlite3`.

Every call is one short transaction on indexed rows, so it runs right away on
the event loop when the connection is free (tens of microseconds, no fsync), and
on the database's worker thread when another process holds the file's write lock
(see :mod:`tokenwire.stores.sqlite_database`). Each write is its own
``BEGIN IMMEDIATE`` transaction, committed before the coroutine returns::

    async with SQLiteConversationStore("var/conversations.db") as store:
        conv = await store.create_conversation("alice", title="New chat")

The file runs in WAL mode with ``synchronous=NORMAL``: a committed write
survives a crash of the process; a power loss may undo the last few commits
(SQLite's documented trade-off for WAL at this level), never corrupt the file.

Schema changes are appended to :data:`~tokenwire.stores.sqlite_schema.MIGRATIONS`;
``open()`` applies the ones a file has not seen yet, each in one transaction,
and records progress in ``PRAGMA user_version``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, Self

from tokenwire.stores import sqlite_queries as queries
from tokenwire.stores.conversations import (
    MAX_ID_LENGTH,
    BegunTurn,
    Conversation,
    Page,
    StoreClosedError,
    StoredMessage,
    TurnEnd,
    TurnRecord,
    conversation_not_found,
    is_valid_id,
    new_id,
    validate_limit,
    validate_message_id,
    validate_role,
)
from tokenwire.stores.cursors import (
    conversations_cursor,
    messages_cursor,
    page_limit,
    read_conversations_cursor,
    read_messages_cursor,
)
from tokenwire.stores.heartbeat import Heartbeat, check_timings
from tokenwire.stores.moderation_events import ModerationEventQuery, ModerationEventRecord
from tokenwire.stores.rows import check_title, check_turn_ids, turn_not_found
from tokenwire.stores.sql_moderation_events import (
    insert_events_sqlite,
    page_sql,
    select_events_sqlite,
)
from tokenwire.stores.sql_usage import USAGE_COLUMNS, record_values, totals_from_rows, totals_sql
from tokenwire.stores.sqlite_database import SQLiteDatabase, write_transaction
from tokenwire.stores.sqlite_schema import MIGRATIONS
from tokenwire.stores.usage import UsageRecord, UsageTotal, check_usage_query

__all__ = ["MIGRATIONS", "SQLiteConversationStore"]

_CONVERSATION_PREFIX: Final = "conv"
_MESSAGE_PREFIX: Final = "msg"
_GATEWAY_PREFIX: Final = "gw"
_FORGET_AFTER_TIMEOUTS: Final = 10  # a gateway silent this many timeouts loses its row


class SQLiteConversationStore:
    """A :class:`~tokenwire.stores.ConversationStore` in one SQLite file.

    ``path`` is a file or ``":memory:"`` for a throwaway store. The file is the
    server user's alone: created with mode 0600 (its ``-wal`` and ``-shm`` too),
    with missing parent directories created 0700. ``clock`` gives unix seconds;
    tests pass a fake one.

    Several store instances (processes) may share one file; each is a gateway
    with its own :attr:`gateway_id` that beats every ``heartbeat_s`` seconds
    while open. A running turn of a gateway silent for ``gateway_timeout_s``
    (by ``clock``) is dead: the next look at it ends it. An idempotency key
    answers retries for ``idempotency_ttl_s`` seconds.

    Example::

        store = SQLiteConversationStore("var/conversations.db")
        await store.open()
        try:
            begun = await store.begin_turn("alice", "", title="Hi", content="Hi",
                                           turn_id=new_id("turn"), answer_id=new_id("msg"),
                                           model="smollm2")
            await store.finish_turn("alice", begun.turn.conversation_id, begun.turn.turn_id,
                                    begun.turn.answer_id, TurnEnd("Hello!", True, "stop"))
        finally:
            await store.close()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        heartbeat_s: float = 2.0,
        gateway_timeout_s: float = 10.0,
        idempotency_ttl_s: float = 86400.0,
    ) -> None:
        check_timings(
            heartbeat_s=heartbeat_s,
            gateway_timeout_s=gateway_timeout_s,
            idempotency_ttl_s=idempotency_ttl_s,
        )
        self._db = SQLiteDatabase(
            path,
            migrations=MIGRATIONS,
            name="conversation",
            closed_error=StoreClosedError,
            thread_name="tokenwire-sqlite",
        )
        self._clock = clock
        self._gateway_id = new_id(_GATEWAY_PREFIX)
        self._gateway_timeout_s = gateway_timeout_s
        self._idempotency_ttl_s = idempotency_ttl_s
        self._heartbeat = Heartbeat(self.beat, interval_s=heartbeat_s)

    @property
    def path(self) -> str:
        """The database file, or ``":memory:"``."""
        return self._db.path

    @property
    def gateway_id(self) -> str:
        """This store instance's gateway id, stamped on the turns it begins."""
        return self._gateway_id

    async def open(self) -> None:
        """Connect, set the pragmas, apply pending migrations and start beating.

        A second call is a no-op.
        """
        await self._db.open()
        await self.beat()
        self._heartbeat.start()

    async def close(self) -> None:
        """Stop beating, finish queued calls, close the connection and stop the worker.

        This gateway's row goes first, so turns it still runs count as dead at
        once. Idempotent. Calls made after ``close()`` starts raise StoreClosedError.
        """
        await self._heartbeat.stop()
        with contextlib.suppress(StoreClosedError):
            await self._db.run_fast(queries.forget_gateway, self._gateway_id)
        await self._db.close()

    async def beat(self) -> None:
        """Record now (by the store's clock) as this gateway's last sign of life.

        The heartbeat task calls it every ``heartbeat_s`` seconds, and ``open()``
        once; a test with a fake clock calls it to move the beat to the clock's
        present (or advances the clock without calling it to make the gateway
        look dead to the other stores of the file).
        """
        now = self._clock()
        forget_before = now - _FORGET_AFTER_TIMEOUTS * self._gateway_timeout_s
        await self._db.run_fast(queries.beat, self._gateway_id, now, forget_before)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def create_conversation(self, owner: str, *, title: str) -> Conversation:
        """Create an empty conversation owned by ``owner``."""
        conversation_id = new_id(_CONVERSATION_PREFIX)
        return await self._db.run_fast(
            queries.create_conversation, owner, conversation_id, title, self._clock()
        )

    async def get_conversation(self, owner: str, conversation_id: str) -> Conversation:
        """Return ``owner``'s conversation; NotFoundError if missing, foreign or malformed."""
        self._check_id(conversation_id)
        return await self._db.run_fast(queries.get_conversation, owner, conversation_id)

    async def add_message(
        self,
        owner: str,
        conversation_id: str,
        *,
        role: str,
        content: str,
        turn_id: str,
        message_id: str | None = None,
        complete: bool = True,
    ) -> StoredMessage:
        """Append a message after all earlier ones and bump the conversation's ``updated_at``.

        Raises NotFoundError as :meth:`get_conversation` does, InvalidArgumentError
        for a role outside ``system``/``user``/``assistant`` or a message id that
        is empty, too long, or already used.
        """
        validate_role(role)
        if message_id is None:
            message_id = new_id(_MESSAGE_PREFIX)
        else:
            validate_message_id(message_id)
        self._check_id(conversation_id)
        message = StoredMessage(
            message_id, conversation_id, role, content, self._clock(), turn_id, complete
        )
        return await self._db.run_fast(queries.add_message, owner, conversation_id, message)

    async def list_messages(
        self, owner: str, conversation_id: str, *, limit: int | None = None
    ) -> list[StoredMessage]:
        """Return the messages oldest first; with ``limit``, the newest ``limit`` of them."""
        validate_limit(limit)
        self._check_id(conversation_id)
        return await self._db.run_fast(queries.list_messages, owner, conversation_id, limit)

    async def begin_turn(
        self,
        owner: str,
        conversation_id: str,
        *,
        title: str,
        content: str,
        turn_id: str,
        answer_id: str,
        model: str,
        idempotency_key: str = "",
    ) -> BegunTurn:
        """Store a turn's user message and hold the conversation for it, in one transaction.

        See :meth:`ConversationStore.begin_turn`. A replay reports
        ``created_conversation=False``. InvalidArgumentError for a ``turn_id`` or
        ``answer_id`` that is empty, too long, or (``turn_id``) already used.
        """
        check_turn_ids(turn_id, answer_id, idempotency_key)
        # With a key, a replay answers whatever conversation id this call names.
        if conversation_id and not idempotency_key:
            self._check_id(conversation_id)
        now = self._clock()
        new = queries.NewTurn(
            owner=owner,
            conversation_id=conversation_id,
            new_conversation_id=new_id(_CONVERSATION_PREFIX),
            title=title,
            content=content,
            message_id=new_id(_MESSAGE_PREFIX),
            turn_id=turn_id,
            answer_id=answer_id,
            model=model,
            idempotency_key=idempotency_key,
            key_expires_at=now + self._idempotency_ttl_s,
        )
        return await self._db.run_fast(queries.begin_turn, new, self._liveness(now))

    async def finish_turn(
        self, owner: str, conversation_id: str, turn_id: str, answer_id: str, end: TurnEnd
    ) -> bool:
        """Store the answer of a running turn and end it; False (storing nothing) if the
        turn is not running (ended, declared dead, its conversation deleted, unknown)."""
        validate_message_id(answer_id)
        return await self._db.run_fast(
            queries.finish_turn, owner, conversation_id, turn_id, answer_id, end, self._clock()
        )

    async def discard_turn(self, owner: str, conversation_id: str, turn_id: str) -> None:
        """Undo :meth:`begin_turn` of a running turn; a no-op for any other."""
        await self._db.run_fast(queries.discard_turn, owner, conversation_id, turn_id)

    async def get_turn(self, owner: str, turn_id: str) -> TurnRecord:
        """``owner``'s turn; a running one of a dead gateway is ended first, and so
        reported done with finish reason ``"error"``. NotFoundError if missing or foreign."""
        if not turn_id or len(turn_id) > MAX_ID_LENGTH:
            raise turn_not_found(turn_id)
        live = self._liveness(self._clock())
        return await self._db.run_fast(queries.get_turn, owner, turn_id, live)

    async def list_conversations(
        self, owner: str, *, page_size: int, cursor: str = ""
    ) -> Page[Conversation]:
        """``owner``'s conversations, most recently updated first, ``page_size`` at a time
        (at most :data:`~tokenwire.stores.cursors.MAX_PAGE_SIZE`)."""
        limit = page_limit(page_size)
        after = read_conversations_cursor(cursor) if cursor else None
        rows = await self._db.run_fast(queries.list_conversations, owner, after, limit + 1)
        if len(rows) <= limit:
            return Page(rows)
        last = rows[limit - 1]
        return Page(rows[:limit], conversations_cursor(updated_at=last.updated_at,
                                                       conversation_id=last.id))  # fmt: skip

    async def rename_conversation(
        self, owner: str, conversation_id: str, title: str
    ) -> Conversation:
        """Set the title (stripped of surrounding whitespace; not empty, at most
        :data:`MAX_TITLE_BYTES` bytes) and move ``updated_at`` forward."""
        title = check_title(title)
        self._check_id(conversation_id)
        return await self._db.run_fast(
            queries.rename_conversation, owner, conversation_id, title, self._clock()
        )

    async def delete_conversation(self, owner: str, conversation_id: str) -> None:
        """Delete the conversation with its messages and turns."""
        self._check_id(conversation_id)
        await self._db.run_fast(queries.delete_conversation, owner, conversation_id)

    async def page_messages(
        self, owner: str, conversation_id: str, *, page_size: int, cursor: str = ""
    ) -> Page[StoredMessage]:
        """A page of the messages, oldest first; ``cursor`` as in :meth:`list_conversations`."""
        limit = page_limit(page_size)
        self._check_id(conversation_id)
        after = read_messages_cursor(cursor, conversation_id) if cursor else 0
        rows = await self._db.run_fast(
            queries.page_messages, owner, conversation_id, after, limit + 1
        )
        if len(rows) <= limit:
            return Page(rows)
        return Page(rows[:limit], messages_cursor(conversation_id=conversation_id,
                                                  seq=rows[limit - 1].seq))  # fmt: skip

    async def record_usage(self, record: UsageRecord) -> None:
        """Record one turn's usage; a turn already recorded keeps its first row."""
        await self._db.run_fast(_insert_usage, record)

    async def usage_totals(
        self, *, start: float, end: float, group_by: str, tenant: str = ""
    ) -> list[UsageTotal]:
        """Usage of ``start <= recorded_at < end`` per group and model (see the contract).

        On the worker thread: a long range reads many rows, which the event loop
        must not wait for.
        """
        check_usage_query(start, end, group_by)
        sql = totals_sql(group_by, tenant=bool(tenant), markers=("?", "?", "?"))
        params = (start, end, tenant) if tenant else (start, end)
        return await self._db.run(_select_totals, sql, params)

    async def record_moderation_events(self, events: Sequence[ModerationEventRecord]) -> None:
        """Write a batch of flagged moderation events in one transaction, on the worker
        thread (the abuse monitor writes them in the background)."""
        if events:
            await self._db.run(insert_events_sqlite, events)

    async def list_moderation_events(
        self, query: ModerationEventQuery
    ) -> Page[ModerationEventRecord]:
        """A page of flagged moderation events, newest first (see the contract)."""
        sql, params = page_sql(query, lambda _: "?")
        return await self._db.run(select_events_sqlite, sql, params, query.page_size)

    def _liveness(self, now: float) -> queries.Liveness:
        return queries.Liveness(self._gateway_id, self._gateway_timeout_s, now)

    @staticmethod
    def _check_id(conversation_id: str) -> None:
        if not is_valid_id(conversation_id, _CONVERSATION_PREFIX):
            raise conversation_not_found(conversation_id)


def _insert_usage(conn: sqlite3.Connection, record: UsageRecord) -> None:
    with write_transaction(conn):
        conn.execute(
            f"INSERT OR IGNORE INTO usage_records ({USAGE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            record_values(record),
        )


def _select_totals(
    conn: sqlite3.Connection, sql: str, params: tuple[object, ...]
) -> list[UsageTotal]:
    return totals_from_rows(conn.execute(sql, params).fetchall())
