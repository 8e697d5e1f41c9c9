"""The shared conversation store: PostgreSQL through an :mod:`asyncpg` pool.

Every gateway of a fleet opens one :class:`PostgresConversationStore` on the
same database; a conversation started on one gateway continues on any other.
Each method is one transaction and one round trip (the turn changes are
PL/pgSQL functions, see :mod:`tokenwire.stores.postgres_schema`), and a turn
holds its conversation against every gateway until it finishes, or until its
gateway stops beating::

    store = PostgresConversationStore("postgresql://db.internal/tokenwire", schema="chat")
    await store.open()  # creates the schema and migrates it, safely from many gateways
    try:
        conv = await store.create_conversation("alice", title="New chat")
    finally:
        await store.close()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Self

import asyncpg  # type: ignore[import-untyped]

from tokenwire.errors import InvalidArgumentError
from tokenwire.stores import postgres_schema as pg_schema
from tokenwire.stores.conversations import (
    MAX_ID_LENGTH,
    BegunTurn,
    Conversation,
    Page,
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
from tokenwire.stores.postgres_pool import PostgresPool
from tokenwire.stores.rows import (
    MESSAGE_COLUMNS,
    TURN_RECORD_COLUMNS,
    begun_from_row,
    busy,
    check_title,
    check_turn_ids,
    message_from_row,
    turn_from_row,
    turn_not_found,
)
from tokenwire.stores.sql_moderation_events import (
    EVENT_COLUMNS,
    event_values,
    events_page,
    page_sql,
)
from tokenwire.stores.sql_usage import USAGE_COLUMNS, record_values, totals_from_rows, totals_sql
from tokenwire.stores.usage import UsageRecord, UsageTotal, check_usage_query

__all__ = ["PostgresConversationStore"]

_CONVERSATION_PREFIX: Final = "conv"
_MESSAGE_PREFIX: Final = "msg"
_GATEWAY_PREFIX: Final = "gw"
_FORGET_AFTER_TIMEOUTS: Final = 10  # a gateway silent this many timeouts loses its row
_ATTEMPTS: Final = 3  # a begin_turn that lost a race (same new key, deadlock) is tried again
_CONVERSATION_COLUMNS: Final = "id, owner, title, created_at, updated_at"
_M_COLUMNS: Final = ", ".join(f"m.{name.strip()}" for name in MESSAGE_COLUMNS.split(","))


class PostgresConversationStore:
    """A :class:`~tokenwire.stores.ConversationStore` in PostgreSQL, shared by gateways.

    ``dsn`` is a libpq connection string; the tables live in ``schema`` (created
    when missing; a lowercase name), reached through at most ``pool_size``
    connections. The timings and ``clock`` work as in
    :class:`~tokenwire.stores.sqlite.SQLiteConversationStore`: each instance is a
    gateway beating every ``heartbeat_s`` seconds while open.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        pool_size: int = 10,
        clock: Callable[[], float] = time.time,
        heartbeat_s: float = 2.0,
        gateway_timeout_s: float = 10.0,
        idempotency_ttl_s: float = 86400.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        check_timings(
            heartbeat_s=heartbeat_s,
            gateway_timeout_s=gateway_timeout_s,
            idempotency_ttl_s=idempotency_ttl_s,
        )
        self._pool = PostgresPool(
            dsn, schema=schema, size=pool_size, connect_timeout_s=connect_timeout_s
        )
        self._clock = clock
        self._gateway_id = new_id(_GATEWAY_PREFIX)
        self._gateway_timeout_s = gateway_timeout_s
        self._idempotency_ttl_s = idempotency_ttl_s
        self._heartbeat = Heartbeat(self.beat, interval_s=heartbeat_s)

    @property
    def gateway_id(self) -> str:
        """This store instance's gateway id, stamped on the turns it begins."""
        return self._gateway_id

    @property
    def where(self) -> str:
        """The server and database, as errors name them (no user, no password)."""
        return self._pool.where

    async def open(self) -> None:
        """Connect, create and migrate the schema, and start beating. A second call is a
        no-op; after :meth:`close` it raises StoreClosedError.

        StoreClosedError (UNAVAILABLE) when PostgreSQL cannot be reached or refuses us.
        """
        if await self._pool.open():
            await self._beat(forget=True)
            self._heartbeat.start()

    async def close(self) -> None:
        """Stop beating, remove this gateway (its running turns are dead from now on),
        and close the pool once calls in flight are done. Idempotent."""
        await self._heartbeat.stop()
        await self._pool.close(("DELETE FROM gateways WHERE id = $1", self._gateway_id))

    async def beat(self) -> None:
        """Record now (by the store's clock) as this gateway's last sign of life.

        As :meth:`tokenwire.stores.sqlite.SQLiteConversationStore.beat`.
        """
        await self._beat(forget=False)

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
        conversation_id, now = new_id(_CONVERSATION_PREFIX), self._clock()
        await self._pool.call(
            "execute",
            "INSERT INTO conversations (id, owner, title, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $4)",
            conversation_id, owner, title, now,
        )  # fmt: skip
        return Conversation(conversation_id, owner, title, now, now)

    async def get_conversation(self, owner: str, conversation_id: str) -> Conversation:
        """Return ``owner``'s conversation; NotFoundError if missing, foreign or malformed."""
        _check_id(conversation_id)
        row = await self._pool.call(
            "fetchrow",
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = $1 AND owner = $2",
            conversation_id,
            owner,
        )
        if row is None:
            raise conversation_not_found(conversation_id)
        return Conversation(*row)

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
        """Append a message after all earlier ones and bump the conversation's ``updated_at``."""
        validate_role(role)
        if message_id is None:
            message_id = new_id(_MESSAGE_PREFIX)
        else:
            validate_message_id(message_id)
        _check_id(conversation_id)
        now = self._clock()
        try:
            seq = await self._pool.call(
                "fetchval",
                "WITH c AS (UPDATE conversations"
                " SET updated_at = GREATEST(updated_at, $3), last_seq = last_seq + 1"
                " WHERE id = $1 AND owner = $2 RETURNING id, last_seq)"
                " INSERT INTO messages"
                " (id, conversation_id, seq, role, content, turn_id, complete, created_at)"
                " SELECT $4, c.id, c.last_seq, $5, $6, $7, $8, $3 FROM c RETURNING seq",
                conversation_id, owner, now, message_id, role, content, turn_id, complete,
            )  # fmt: skip
        except asyncpg.UniqueViolationError as exc:
            raise InvalidArgumentError(f"message_id {message_id!r} is already used") from exc
        if seq is None:
            raise conversation_not_found(conversation_id)
        return StoredMessage(
            message_id, conversation_id, role, content, now, turn_id, complete, seq
        )

    async def list_messages(
        self, owner: str, conversation_id: str, *, limit: int | None = None
    ) -> list[StoredMessage]:
        """Return the messages oldest first; with ``limit``, the newest ``limit`` of them."""
        validate_limit(limit)
        _check_id(conversation_id)
        return await self._messages("ORDER BY seq DESC LIMIT $3", conversation_id, owner, limit)

    async def page_messages(
        self, owner: str, conversation_id: str, *, page_size: int, cursor: str = ""
    ) -> Page[StoredMessage]:
        """A page of the messages, oldest first; ``cursor`` as in :meth:`list_conversations`."""
        limit = page_limit(page_size)
        _check_id(conversation_id)
        after = read_messages_cursor(cursor, conversation_id) if cursor else 0
        rows = await self._messages(
            "AND seq > $3 ORDER BY seq LIMIT $4", conversation_id, owner, after, limit + 1
        )
        if len(rows) <= limit:
            return Page(rows)
        last = rows[limit - 1]
        return Page(rows[:limit], messages_cursor(conversation_id=conversation_id, seq=last.seq))

    async def list_conversations(
        self, owner: str, *, page_size: int, cursor: str = ""
    ) -> Page[Conversation]:
        """``owner``'s conversations, most recently updated first, ``page_size`` at a time."""
        limit = page_limit(page_size)
        select = f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE owner = $1"
        order = " ORDER BY updated_at DESC, id DESC LIMIT $2"
        if cursor:
            after = read_conversations_cursor(cursor)
            rows = await self._pool.call(
                "fetch", select + " AND (updated_at, id) < ($3, $4)" + order,
                owner, limit + 1, *after,
            )  # fmt: skip
        else:
            rows = await self._pool.call("fetch", select + order, owner, limit + 1)
        conversations = [Conversation(*row) for row in rows]
        if len(conversations) <= limit:
            return Page(conversations)
        last = conversations[limit - 1]
        return Page(
            conversations[:limit],
            conversations_cursor(updated_at=last.updated_at, conversation_id=last.id),
        )

    async def rename_conversation(
        self, owner: str, conversation_id: str, title: str
    ) -> Conversation:
        """Set the title (stripped; not empty, at most MAX_TITLE_BYTES bytes) and move
        ``updated_at`` forward."""
        title = check_title(title)
        _check_id(conversation_id)
        row = await self._pool.call(
            "fetchrow",
            "UPDATE conversations SET title = $3, updated_at = GREATEST(updated_at, $4)"
            f" WHERE id = $1 AND owner = $2 RETURNING {_CONVERSATION_COLUMNS}",
            conversation_id, owner, title, self._clock(),
        )  # fmt: skip
        if row is None:
            raise conversation_not_found(conversation_id)
        return Conversation(*row)

    async def delete_conversation(self, owner: str, conversation_id: str) -> None:
        """Delete the conversation with its messages and turns (ON DELETE CASCADE)."""
        _check_id(conversation_id)
        status = await self._pool.call(
            "execute", "DELETE FROM conversations WHERE id = $1 AND owner = $2",
            conversation_id, owner,
        )  # fmt: skip
        if status != "DELETE 1":
            raise conversation_not_found(conversation_id)

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

        As :meth:`SQLiteConversationStore.begin_turn
        <tokenwire.stores.sqlite.SQLiteConversationStore.begin_turn>`.
        """
        check_turn_ids(turn_id, answer_id, idempotency_key)
        if conversation_id and not idempotency_key:
            _check_id(conversation_id)
        message_id = new_id(_MESSAGE_PREFIX)
        for attempt in range(1, _ATTEMPTS + 1):
            now = self._clock()
            try:
                row = await self._pool.call(
                    "fetchrow",
                    f"SELECT {TURN_RECORD_COLUMNS} FROM begin_turn("
                    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                    owner, conversation_id, new_id(_CONVERSATION_PREFIX), title, content,
                    message_id, turn_id, answer_id, model, idempotency_key,
                    now + self._idempotency_ttl_s, self._gateway_id, now,
                    now - self._gateway_timeout_s,
                )  # fmt: skip
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "turns_pkey":
                    raise InvalidArgumentError(f"turn_id {turn_id!r} is already used") from exc
                if attempt == _ATTEMPTS:  # the same new key begun at once elsewhere
                    raise
            except asyncpg.DeadlockDetectedError:
                if attempt == _ATTEMPTS:
                    raise
            except asyncpg.PostgresError as exc:
                if exc.sqlstate == pg_schema.NOT_FOUND:
                    raise conversation_not_found(conversation_id) from None
                if exc.sqlstate == pg_schema.BUSY:
                    raise busy(conversation_id, exc.detail or "") from None
                raise
            else:
                # Our fresh message id is the user message's only when the turn is new.
                replayed = row[2] != message_id
                created = not replayed and not conversation_id
                return begun_from_row(row, replayed=replayed, created_conversation=created)
        raise AssertionError("unreachable")  # every attempt returns or raises

    async def finish_turn(
        self, owner: str, conversation_id: str, turn_id: str, answer_id: str, end: TurnEnd
    ) -> bool:
        """Store the answer of a running turn and end it; False (storing nothing) if the
        turn is not running (ended, declared dead, its conversation deleted, unknown)."""
        validate_message_id(answer_id)
        try:
            finished = await self._pool.call(
                "fetchval",
                "SELECT finish_turn($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                owner, conversation_id, turn_id, answer_id, end.answer, end.complete,
                end.finish_reason, end.filter_category, end.prompt_tokens,
                end.completion_tokens, self._clock(),
            )  # fmt: skip
        except asyncpg.UniqueViolationError as exc:
            raise InvalidArgumentError(f"message_id {answer_id!r} is already used") from exc
        return bool(finished)

    async def discard_turn(self, owner: str, conversation_id: str, turn_id: str) -> None:
        """Undo :meth:`begin_turn` of a running turn; a no-op for any other."""
        await self._pool.call(
            "execute", "SELECT discard_turn($1, $2, $3)", owner, conversation_id, turn_id
        )

    async def get_turn(self, owner: str, turn_id: str) -> TurnRecord:
        """``owner``'s turn; a running one of a dead gateway is ended first, and so
        reported done with finish reason ``"error"``. NotFoundError if missing or foreign."""
        if not turn_id or len(turn_id) > MAX_ID_LENGTH:
            raise turn_not_found(turn_id)
        now = self._clock()
        row = await self._pool.call(
            "fetchrow",
            f"SELECT {TURN_RECORD_COLUMNS} FROM get_turn($1, $2, $3, $4, $5)",
            owner, turn_id, self._gateway_id, now, now - self._gateway_timeout_s,
        )  # fmt: skip
        if row is None:
            raise turn_not_found(turn_id)
        return turn_from_row(row)

    # --- helpers ---------------------------------------------------------------

    async def _beat(self, *, forget: bool) -> None:
        now = self._clock()
        forget_before = now - _FORGET_AFTER_TIMEOUTS * self._gateway_timeout_s
        await self._pool.call(
            "execute",
            "WITH gone AS (DELETE FROM gateways WHERE $3 AND heartbeat_at < $4 AND id <> $1)"
            " INSERT INTO gateways (id, heartbeat_at) VALUES ($1, $2)"
            " ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
            self._gateway_id, now, forget, forget_before,
        )  # fmt: skip

    async def _messages(self, tail: str, conversation_id: str, *args: Any) -> list[StoredMessage]:
        """Messages of ``owner``'s conversation (ownership checked in the same query):
        ``tail`` filters, orders and limits them; oldest first."""
        rows = await self._pool.call(
            "fetch",
            f"SELECT {_M_COLUMNS} FROM conversations AS c LEFT JOIN LATERAL ("
            f" SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = c.id {tail}"
            ") AS m ON true WHERE c.id = $1 AND c.owner = $2 ORDER BY m.seq",
            conversation_id, *args,
        )  # fmt: skip
        if not rows:
            raise conversation_not_found(conversation_id)
        return [message_from_row(row) for row in rows if row[0] is not None]

    async def record_usage(self, record: UsageRecord) -> None:
        """Record one turn's usage; a turn already recorded keeps its first row."""
        await self._pool.call(
            "execute",
            f"INSERT INTO usage_records ({USAGE_COLUMNS})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (turn_id) DO NOTHING",
            *record_values(record),
        )

    async def usage_totals(
        self, *, start: float, end: float, group_by: str, tenant: str = ""
    ) -> list[UsageTotal]:
        """Usage of ``start <= recorded_at < end`` per group and model (see the contract)."""
        check_usage_query(start, end, group_by)
        sql = totals_sql(group_by, tenant=bool(tenant), markers=("$1", "$2", "$3"))
        params = (start, end, tenant) if tenant else (start, end)
        return totals_from_rows(await self._pool.call("fetch", sql, *params))

    async def record_moderation_events(self, events: Sequence[ModerationEventRecord]) -> None:
        """Write a batch of flagged moderation events (ids already kept are ignored)."""
        if events:
            await self._pool.call(
                "executemany",
                f"INSERT INTO moderation_events ({EVENT_COLUMNS}) VALUES"
                " ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
                [event_values(event) for event in events],
            )

    async def list_moderation_events(
        self, query: ModerationEventQuery
    ) -> Page[ModerationEventRecord]:
        """A page of flagged moderation events, newest first (see the contract)."""
        sql, params = page_sql(query, lambda n: f"${n}")
        return events_page(await self._pool.call("fetch", sql, *params), query.page_size)


def _check_id(conversation_id: str) -> None:
    if not is_valid_id(conversation_id, _CONVERSATION_PREFIX):
        raise conversation_not_found(conversation_id)
