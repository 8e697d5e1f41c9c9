"""The SQL of :class:`~tokenwire.stores.sqlite.SQLiteConversationStore`, connection side.

Each function here is one transaction on the connection it is given, run by
:meth:`~tokenwire.stores.sqlite_database.SQLiteDatabase.run_fast` (so inside the
database's lock, on the event loop or its worker thread). Writes are
``BEGIN IMMEDIATE``: they hold the file's write lock from their first read, so
a read-then-write cannot race a writer in another process. Times come in as
arguments (the store's clock), never from SQLite.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from tokenwire.errors import InvalidArgumentError
from tokenwire.stores.conversations import (
    BegunTurn,
    Conversation,
    StoredMessage,
    TurnEnd,
    TurnRecord,
    conversation_not_found,
)
from tokenwire.stores.rows import (
    DEAD_TURN_REASON,
    MESSAGE_COLUMNS,
    TURN_RECORD_COLUMNS,
    begun_from_row,
    busy,
    message_from_row,
    turn_from_row,
    turn_not_found,
)
from tokenwire.stores.sqlite_database import read_transaction, write_transaction

__all__ = [
    "Liveness",
    "NewTurn",
    "add_message",
    "beat",
    "begin_turn",
    "create_conversation",
    "delete_conversation",
    "discard_turn",
    "finish_turn",
    "forget_gateway",
    "get_conversation",
    "get_turn",
    "list_conversations",
    "list_messages",
    "page_messages",
    "rename_conversation",
]

_CONVERSATION_COLUMNS = "id, owner, title, created_at, updated_at"
# A turn (table alias-free, as UPDATE needs) whose gateway is alive: this one, or
# one that beat since ? (the two parameters: our gateway id, the oldest live beat).
_ALIVE = (
    "(turns.gateway_id = ? OR EXISTS (SELECT 1 FROM gateways"
    " WHERE gateways.id = turns.gateway_id AND gateways.heartbeat_at >= ?))"
)


@dataclass(frozen=True, slots=True)
class Liveness:
    """Who counts as alive when a running turn is looked at, at time ``now``.

    Our own gateway always does (this process is running); another one while
    its last beat is at most ``timeout_s`` old.
    """

    gateway_id: str
    timeout_s: float
    now: float

    @property
    def params(self) -> tuple[str, float]:
        """The two parameters of :data:`_ALIVE`."""
        return self.gateway_id, self.now - self.timeout_s


@dataclass(frozen=True, slots=True)
class NewTurn:
    """What :func:`begin_turn` stores (ids minted by the caller)."""

    owner: str
    conversation_id: str  # empty: create one with new_conversation_id and title
    new_conversation_id: str
    title: str
    content: str
    message_id: str
    turn_id: str
    answer_id: str
    model: str
    idempotency_key: str
    key_expires_at: float


def create_conversation(
    conn: sqlite3.Connection, owner: str, conversation_id: str, title: str, now: float
) -> Conversation:
    with write_transaction(conn):
        conn.execute(
            f"INSERT INTO conversations ({_CONVERSATION_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
            (conversation_id, owner, title, now, now),
        )
    return Conversation(conversation_id, owner, title, now, now)


def get_conversation(conn: sqlite3.Connection, owner: str, conversation_id: str) -> Conversation:
    row = conn.execute(
        f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ? AND owner = ?",
        (conversation_id, owner),
    ).fetchone()
    if row is None:
        raise conversation_not_found(conversation_id)
    return Conversation(*row)


def add_message(
    conn: sqlite3.Connection, owner: str, conversation_id: str, message: StoredMessage
) -> StoredMessage:
    with write_transaction(conn):
        return _append(conn, owner, message)


def list_messages(
    conn: sqlite3.Connection, owner: str, conversation_id: str, limit: int | None
) -> list[StoredMessage]:
    # One read transaction, so the ownership check and the rows agree.
    with read_transaction(conn):
        _check_owner(conn, owner, conversation_id)
        # Newest `limit` by seq, then back to oldest first; LIMIT -1 is "no limit".
        rows = conn.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM ("
            f" SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?"
            " ORDER BY seq DESC LIMIT ?"
            ") ORDER BY seq ASC",
            (conversation_id, -1 if limit is None else limit),
        ).fetchall()
    return [message_from_row(row) for row in rows]


def page_messages(
    conn: sqlite3.Connection, owner: str, conversation_id: str, after_seq: int, limit: int
) -> list[StoredMessage]:
    """Up to ``limit`` messages after ``after_seq``, oldest first."""
    with read_transaction(conn):
        _check_owner(conn, owner, conversation_id)
        rows = conn.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (conversation_id, after_seq, limit),
        ).fetchall()
    return [message_from_row(row) for row in rows]


def list_conversations(
    conn: sqlite3.Connection, owner: str, after: tuple[float, str] | None, limit: int
) -> list[Conversation]:
    """Up to ``limit`` conversations after ``(updated_at, id)``, newest first."""
    if after is None:
        rows = conn.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE owner = ?"
            " ORDER BY updated_at DESC, id DESC LIMIT ?",
            (owner, limit),
        ).fetchall()
    else:
        rows = conn.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations"
            " WHERE owner = ? AND (updated_at, id) < (?, ?)"
            " ORDER BY updated_at DESC, id DESC LIMIT ?",
            (owner, *after, limit),
        ).fetchall()
    return [Conversation(*row) for row in rows]


def rename_conversation(
    conn: sqlite3.Connection, owner: str, conversation_id: str, title: str, now: float
) -> Conversation:
    with write_transaction(conn):
        row = conn.execute(
            "UPDATE conversations SET title = ?, updated_at = MAX(updated_at, ?)"
            f" WHERE id = ? AND owner = ? RETURNING {_CONVERSATION_COLUMNS}",
            (title, now, conversation_id, owner),
        ).fetchone()
    if row is None:
        raise conversation_not_found(conversation_id)
    return Conversation(*row)


def delete_conversation(conn: sqlite3.Connection, owner: str, conversation_id: str) -> None:
    # Messages and turns go with it: ON DELETE CASCADE, and the connection runs
    # with foreign_keys = ON (see SQLiteDatabase).
    with write_transaction(conn):
        deleted = conn.execute(
            "DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
        )
        if deleted.rowcount != 1:
            raise conversation_not_found(conversation_id)


def begin_turn(conn: sqlite3.Connection, new: NewTurn, live: Liveness) -> BegunTurn:
    now = live.now
    with write_transaction(conn):
        if new.idempotency_key:
            earlier = conn.execute(
                "SELECT turn_id, key_expires_at FROM turns WHERE owner = ? AND idempotency_key = ?",
                (new.owner, new.idempotency_key),
            ).fetchone()
            if earlier is not None and earlier[1] > now:
                _end_if_dead(conn, earlier[0], live)
                return begun_from_row(_turn_row(conn, new.owner, earlier[0]), replayed=True)
            if earlier is not None:  # expired: the key is free again
                conn.execute(
                    "UPDATE turns SET idempotency_key = NULL, key_expires_at = NULL"
                    " WHERE turn_id = ?",
                    (earlier[0],),
                )
        conversation_id, created = new.conversation_id, not new.conversation_id
        if created:
            conversation_id = new.new_conversation_id
            conn.execute(
                f"INSERT INTO conversations ({_CONVERSATION_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, new.owner, new.title, now, now),
            )
        else:
            _check_owner(conn, new.owner, conversation_id)
            running = conn.execute(
                f"SELECT turn_id, {_ALIVE} FROM turns WHERE conversation_id = ? AND running = 1",
                (*live.params, conversation_id),
            ).fetchone()
            if running is not None and running[1]:
                raise busy(conversation_id, running[0])
            if running is not None:  # its gateway died: the turn ends here, unanswered
                _end(conn, running[0], now)
        message = _append(
            conn,
            new.owner,
            StoredMessage(
                new.message_id, conversation_id, "user", new.content, now, new.turn_id, True
            ),
        )
        key = new.idempotency_key or None
        try:
            conn.execute(
                "INSERT INTO turns (turn_id, conversation_id, owner, idempotency_key,"
                " key_expires_at, user_message_id, answer_id, model, running, gateway_id,"
                " created_conversation, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (
                    new.turn_id, conversation_id, new.owner, key,
                    new.key_expires_at if key else None, new.message_id, new.answer_id,
                    new.model, live.gateway_id, int(created), now,
                ),
            )  # fmt: skip
        except sqlite3.IntegrityError as exc:
            raise InvalidArgumentError(f"turn_id {new.turn_id!r} is already used") from exc
    turn = TurnRecord(
        turn_id=new.turn_id,
        conversation_id=conversation_id,
        user_message_id=new.message_id,
        answer_id=new.answer_id,
        model=new.model,
        idempotency_key=new.idempotency_key,
        running=True,
        created_at=now,
    )
    return BegunTurn(turn, message, replayed=False, created_conversation=created)


def finish_turn(
    conn: sqlite3.Connection,
    owner: str,
    conversation_id: str,
    turn_id: str,
    answer_id: str,
    end: TurnEnd,
    now: float,
) -> bool:
    with write_transaction(conn):
        finished = conn.execute(
            "UPDATE turns SET running = 0, answer_id = ?, finish_reason = ?, filter_category = ?,"
            " prompt_tokens = ?, completion_tokens = ?, finished_at = ?"
            " WHERE turn_id = ? AND owner = ? AND conversation_id = ? AND running = 1",
            (
                answer_id, end.finish_reason, end.filter_category, end.prompt_tokens,
                end.completion_tokens, now, turn_id, owner, conversation_id,
            ),
        )  # fmt: skip
        if finished.rowcount != 1:
            return False  # not running any more (ended, deleted) or never ours
        answer = StoredMessage(
            answer_id, conversation_id, "assistant", end.answer, now, turn_id, end.complete
        )
        _append(conn, owner, answer)
    return True


def discard_turn(conn: sqlite3.Connection, owner: str, conversation_id: str, turn_id: str) -> None:
    with write_transaction(conn):
        row = conn.execute(
            "SELECT user_message_id, created_conversation FROM turns"
            " WHERE turn_id = ? AND owner = ? AND conversation_id = ? AND running = 1",
            (turn_id, owner, conversation_id),
        ).fetchone()
        if row is None:
            return
        conn.execute("DELETE FROM turns WHERE turn_id = ?", (turn_id,))
        conn.execute("DELETE FROM messages WHERE id = ?", (row[0],))
        if row[1]:  # the turn made the conversation: it goes too, unless used since
            conn.execute(
                "DELETE FROM conversations WHERE id = ?"
                " AND NOT EXISTS (SELECT 1 FROM messages WHERE conversation_id = ?)"
                " AND NOT EXISTS (SELECT 1 FROM turns WHERE conversation_id = ?)",
                (conversation_id, conversation_id, conversation_id),
            )


def get_turn(conn: sqlite3.Connection, owner: str, turn_id: str, live: Liveness) -> TurnRecord:
    with write_transaction(conn):
        _end_if_dead(conn, turn_id, live, owner=owner)
        return turn_from_row(_turn_row(conn, owner, turn_id))


def beat(conn: sqlite3.Connection, gateway_id: str, now: float, forget_before: float) -> None:
    """Record that ``gateway_id`` is alive at ``now``; drop gateways silent since
    ``forget_before`` (long dead: a missing gateway counts as dead too)."""
    with write_transaction(conn):
        conn.execute(
            "DELETE FROM gateways WHERE heartbeat_at < ? AND id <> ?", (forget_before, gateway_id)
        )
        conn.execute(
            "INSERT INTO gateways (id, heartbeat_at) VALUES (?, ?)"
            " ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (gateway_id, now),
        )


def forget_gateway(conn: sqlite3.Connection, gateway_id: str) -> None:
    """Remove ``gateway_id``'s row: its running turns are dead from now on."""
    with write_transaction(conn):
        conn.execute("DELETE FROM gateways WHERE id = ?", (gateway_id,))


# --- inside a caller's transaction -------------------------------------------


def _check_owner(conn: sqlite3.Connection, owner: str, conversation_id: str) -> None:
    owned = conn.execute(
        "SELECT 1 FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)
    ).fetchone()
    if owned is None:
        raise conversation_not_found(conversation_id)


def _append(conn: sqlite3.Connection, owner: str, message: StoredMessage) -> StoredMessage:
    """Store ``message`` after all others of its conversation (its ``seq`` is filled in)."""
    # The ownership check and the bump are one statement; MAX keeps
    # updated_at from stepping backwards when the clock does.
    bumped = conn.execute(
        "UPDATE conversations SET updated_at = MAX(updated_at, ?) WHERE id = ? AND owner = ?",
        (message.created_at, message.conversation_id, owner),
    )
    if bumped.rowcount != 1:
        raise conversation_not_found(message.conversation_id)
    # Safe under concurrency: BEGIN IMMEDIATE holds the write lock
    # from before this read until the commit.
    (seq,) = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = ?",
        (message.conversation_id,),
    ).fetchone()
    try:
        conn.execute(
            f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message.id, message.conversation_id, message.role, message.content,
                message.created_at, message.turn_id, int(message.complete), seq,
            ),
        )  # fmt: skip
    except sqlite3.IntegrityError as exc:
        raise InvalidArgumentError(f"message_id {message.id!r} is already used") from exc
    return StoredMessage(
        message.id, message.conversation_id, message.role, message.content,
        message.created_at, message.turn_id, message.complete, seq,
    )  # fmt: skip


def _turn_row(conn: sqlite3.Connection, owner: str, turn_id: str) -> tuple[Any, ...]:
    row: tuple[Any, ...] | None = conn.execute(
        f"SELECT {TURN_RECORD_COLUMNS} FROM turn_records WHERE turn_id = ? AND owner = ?",
        (turn_id, owner),
    ).fetchone()
    if row is None:
        raise turn_not_found(turn_id)
    return row


def _end(conn: sqlite3.Connection, turn_id: str, now: float) -> None:
    conn.execute(
        "UPDATE turns SET running = 0, finish_reason = ?, finished_at = ? WHERE turn_id = ?",
        (DEAD_TURN_REASON, now, turn_id),
    )


def _end_if_dead(
    conn: sqlite3.Connection, turn_id: str, live: Liveness, *, owner: str | None = None
) -> bool:
    """End turn ``turn_id`` if it runs on a dead gateway; whether it did."""
    ended = conn.execute(
        f"UPDATE turns SET running = 0, finish_reason = ?, finished_at = ?"
        f" WHERE turn_id = ? AND owner = COALESCE(?, owner) AND running = 1 AND NOT {_ALIVE}",
        (DEAD_TURN_REASON, live.now, turn_id, owner, *live.params),
    )
    return ended.rowcount == 1
