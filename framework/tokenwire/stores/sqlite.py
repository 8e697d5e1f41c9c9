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

Schema changes are appended to :data:`MIGRATIONS`; ``open()`` applies the ones a
file has not seen yet, each in one transaction, and records progress in
``PRAGMA user_version``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self

from tokenwire.errors import InvalidArgumentError
from tokenwire.stores.conversations import (
    Conversation,
    StoreClosedError,
    StoredMessage,
    conversation_not_found,
    is_valid_id,
    new_id,
    validate_limit,
    validate_message_id,
    validate_role,
)
from tokenwire.stores.sqlite_database import SQLiteDatabase, read_transaction, write_transaction

__all__ = ["MIGRATIONS", "SQLiteConversationStore"]

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: conversations and their messages.
    (
        """
        CREATE TABLE conversations (
            id          TEXT PRIMARY KEY,
            owner       TEXT NOT NULL,
            title       TEXT NOT NULL,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL
        )
        """,
        # Serves "my conversations, newest first".
        "CREATE INDEX conversations_owner_updated ON conversations (owner, updated_at DESC)",
        # seq, not created_at, orders messages: clocks tie and step backwards.
        # No CHECK on role, so a later role needs no table rebuild.
        """
        CREATE TABLE messages (
            id               TEXT PRIMARY KEY,
            conversation_id  TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            seq              INTEGER NOT NULL,
            role             TEXT NOT NULL,
            content          TEXT NOT NULL,
            turn_id          TEXT NOT NULL,
            complete         INTEGER NOT NULL CHECK (complete IN (0, 1)),
            created_at       REAL NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX messages_conversation_seq ON messages (conversation_id, seq)",
    ),
)
"""Schema migrations in order; migration ``n`` (1-based) brings a file to
``user_version = n``. Only ever append: a shipped migration never changes."""

_CONVERSATION_PREFIX: Final = "conv"
_MESSAGE_PREFIX: Final = "msg"
_MESSAGE_COLUMNS: Final = "id, conversation_id, role, content, created_at, turn_id, complete"


class SQLiteConversationStore:
    """A :class:`~tokenwire.stores.ConversationStore` in one SQLite file.

    ``path`` is a file or ``":memory:"`` for a throwaway store. The file is the
    server user's alone: created with mode 0600 (its ``-wal`` and ``-shm`` too),
    with missing parent directories created 0700. ``clock`` gives unix seconds;
    tests pass a fake one.

    Example::

        store = SQLiteConversationStore("var/conversations.db")
        await store.open()
        try:
            conv = await store.create_conversation("alice", title="New chat")
            await store.add_message("alice", conv.id, role="user", content="Hi",
                                    turn_id=new_id("turn"))
        finally:
            await store.close()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = SQLiteDatabase(
            path,
            migrations=MIGRATIONS,
            name="conversation",
            closed_error=StoreClosedError,
            thread_name="tokenwire-sqlite",
        )
        self._clock = clock

    @property
    def path(self) -> str:
        """The database file, or ``":memory:"``."""
        return self._db.path

    async def open(self) -> None:
        """Connect, set the pragmas and apply pending migrations. A second call is a no-op."""
        await self._db.open()

    async def close(self) -> None:
        """Finish queued calls, close the connection and stop the worker thread.

        Idempotent. Calls made after ``close()`` starts raise StoreClosedError.
        """
        await self._db.close()

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
        return await self._db.run_fast(self._create_conversation, owner, title)

    async def get_conversation(self, owner: str, conversation_id: str) -> Conversation:
        """Return ``owner``'s conversation; NotFoundError if missing, foreign or malformed."""
        if not is_valid_id(conversation_id, _CONVERSATION_PREFIX):
            raise conversation_not_found(conversation_id)
        return await self._db.run_fast(self._get_conversation, owner, conversation_id)

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
        if not is_valid_id(conversation_id, _CONVERSATION_PREFIX):
            raise conversation_not_found(conversation_id)
        return await self._db.run_fast(
            self._add_message,
            owner,
            conversation_id,
            message_id=message_id,
            role=role,
            content=content,
            turn_id=turn_id,
            complete=complete,
        )

    async def list_messages(
        self, owner: str, conversation_id: str, *, limit: int | None = None
    ) -> list[StoredMessage]:
        """Return the messages oldest first; with ``limit``, the newest ``limit`` of them."""
        validate_limit(limit)
        if not is_valid_id(conversation_id, _CONVERSATION_PREFIX):
            raise conversation_not_found(conversation_id)
        return await self._db.run_fast(self._list_messages, owner, conversation_id, limit)

    async def begin_turn(
        self, owner: str, conversation_id: str, *, title: str, content: str, turn_id: str
    ) -> StoredMessage:
        """The user's message of a turn, and its new conversation when ``conversation_id``
        is empty, in one transaction."""
        if conversation_id and not is_valid_id(conversation_id, _CONVERSATION_PREFIX):
            raise conversation_not_found(conversation_id)
        return await self._db.run_fast(
            self._begin_turn, owner, conversation_id, title, content, turn_id
        )

    # --- connection side: everything below runs inside SQLiteDatabase's lock ---

    def _begin_turn(
        self,
        conn: sqlite3.Connection,
        owner: str,
        conversation_id: str,
        title: str,
        content: str,
        turn_id: str,
    ) -> StoredMessage:
        now = self._clock()
        message_id = new_id(_MESSAGE_PREFIX)
        with write_transaction(conn):
            if not conversation_id:
                conversation_id = new_id(_CONVERSATION_PREFIX)
                conn.execute(
                    "INSERT INTO conversations (id, owner, title, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (conversation_id, owner, title, now, now),
                )
                # A new conversation: its first message, no ownership or order to look up.
                conn.execute(
                    f"INSERT INTO messages (seq, {_MESSAGE_COLUMNS})"
                    " VALUES (1, ?, ?, 'user', ?, ?, ?, 1)",
                    (message_id, conversation_id, content, now, turn_id),
                )
                return StoredMessage(
                    message_id, conversation_id, "user", content, now, turn_id, True
                )
            return self._append(
                conn, owner, conversation_id, message_id, "user", content, turn_id,
                complete=True, now=now,
            )  # fmt: skip

    def _create_conversation(
        self, conn: sqlite3.Connection, owner: str, title: str
    ) -> Conversation:
        now = self._clock()
        conversation = Conversation(
            id=new_id(_CONVERSATION_PREFIX),
            owner=owner,
            title=title,
            created_at=now,
            updated_at=now,
        )
        with write_transaction(conn):
            conn.execute(
                "INSERT INTO conversations (id, owner, title, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (conversation.id, owner, title, now, now),
            )
        return conversation

    def _get_conversation(
        self, conn: sqlite3.Connection, owner: str, conversation_id: str
    ) -> Conversation:
        row = conn.execute(
            "SELECT id, owner, title, created_at, updated_at FROM conversations"
            " WHERE id = ? AND owner = ?",
            (conversation_id, owner),
        ).fetchone()
        if row is None:
            raise conversation_not_found(conversation_id)
        return Conversation(*row)

    def _add_message(
        self,
        conn: sqlite3.Connection,
        owner: str,
        conversation_id: str,
        *,
        message_id: str,
        role: str,
        content: str,
        turn_id: str,
        complete: bool,
    ) -> StoredMessage:
        with write_transaction(conn):
            return self._append(
                conn, owner, conversation_id, message_id, role, content, turn_id,
                complete=complete, now=self._clock(),
            )  # fmt: skip

    def _append(
        self,
        conn: sqlite3.Connection,
        owner: str,
        conversation_id: str,
        message_id: str,
        role: str,
        content: str,
        turn_id: str,
        *,
        complete: bool,
        now: float,
    ) -> StoredMessage:
        """Append a message inside the caller's write transaction."""
        # The ownership check and the bump are one statement; MAX keeps
        # updated_at from stepping backwards when the clock does.
        bumped = conn.execute(
            "UPDATE conversations SET updated_at = MAX(updated_at, ?) WHERE id = ? AND owner = ?",
            (now, conversation_id, owner),
        )
        if bumped.rowcount != 1:
            raise conversation_not_found(conversation_id)
        # Safe under concurrency: BEGIN IMMEDIATE holds the write lock
        # from before this read until the commit.
        (seq,) = conn.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = ?",
            (conversation_id,),
        ).fetchone()
        try:
            conn.execute(
                f"INSERT INTO messages (seq, {_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, message_id, conversation_id, role, content, now, turn_id, int(complete)),
            )
        except sqlite3.IntegrityError as exc:
            raise InvalidArgumentError(f"message_id {message_id!r} is already used") from exc

        return StoredMessage(
            id=message_id,
            conversation_id=conversation_id,
            role=role,
            content=content,
            created_at=now,
            turn_id=turn_id,
            complete=complete,
        )

    def _list_messages(
        self, conn: sqlite3.Connection, owner: str, conversation_id: str, limit: int | None
    ) -> list[StoredMessage]:
        # One read transaction, so the ownership check and the rows agree.
        with read_transaction(conn):
            owned = conn.execute(
                "SELECT 1 FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner),
            ).fetchone()
            if owned is None:
                raise conversation_not_found(conversation_id)
            # Newest `limit` by seq, then back to oldest first; LIMIT -1 is "no limit".
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM ("
                f" SELECT seq, {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?"
                " ORDER BY seq DESC LIMIT ?"
                ") ORDER BY seq ASC",
                (conversation_id, -1 if limit is None else limit),
            ).fetchall()
        return [
            StoredMessage(
                id=row[0],
                conversation_id=row[1],
                role=row[2],
                content=row[3],
                created_at=row[4],
                turn_id=row[5],
                complete=bool(row[6]),
            )
            for row in rows
        ]
