"""The conversation store contract: a conversation's history, kept per owner.

The chat service appends each turn's messages here so that a later turn naming
the same ``conversation_id`` continues it. Every backend (SQLite embedded,
PostgreSQL at scale) implements :class:`ConversationStore` and shares the
validation helpers below, so both answer the same inputs with the same errors::

    store = SQLiteConversationStore("conversations.db")
    await store.open()
    conv = await store.create_conversation("alice", title="Trip ideas")
    await store.add_message("alice", conv.id, role="user", content="Hi", turn_id=new_id("turn"))
    history = await store.list_messages("alice", conv.id, limit=20)
    await store.close()

A conversation owned by someone else is reported exactly like one that does
not exist (:class:`~tokenwire.errors.NotFoundError`), and so is an id that is
not even well formed: callers learn nothing about ids they do not own.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from tokenwire.errors import InvalidArgumentError, NotFoundError, UnavailableError

__all__ = [
    "MAX_ID_LENGTH",
    "MESSAGE_ROLES",
    "Conversation",
    "ConversationStore",
    "StoreClosedError",
    "StoredMessage",
    "conversation_not_found",
    "is_valid_id",
    "new_id",
    "validate_limit",
    "validate_message_id",
    "validate_role",
]

MAX_ID_LENGTH: Final = 64
"""Longest id a store accepts; longer client-supplied ids are never looked up."""

MESSAGE_ROLES: Final = frozenset({"system", "user", "assistant"})
"""Roles a stored message may have."""

# Prefix: lowercase word; body: a uuid4 in hex. Anything else was not minted here.
_ID_PATTERN: Final = re.compile(r"(?P<prefix>[a-z][a-z0-9]*)_[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation. Times are unix seconds; ``updated_at`` moves on each message."""

    id: str
    owner: str
    title: str
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message of a conversation, as stored.

    ``turn_id`` groups the messages of one turn (the user's message and the
    reply); ``complete`` is false for a reply cut short (cancelled, failed).
    """

    id: str
    conversation_id: str
    role: str
    content: str
    created_at: float
    turn_id: str
    complete: bool


class StoreClosedError(UnavailableError):
    """The store is not open (never opened, or already closed).

    Maps to UNAVAILABLE: a request that reaches a store while the server shuts
    down may be retried on another gateway.
    """


@runtime_checkable
class ConversationStore(Protocol):
    """Where conversations and their messages live. All methods are coroutines.

    Every method that takes ``owner`` and ``conversation_id`` raises
    :class:`~tokenwire.errors.NotFoundError` when the conversation does not
    exist, belongs to another owner, or the id is malformed; the three cases
    are indistinguishable to the caller. A write has been committed durably by
    the time its coroutine returns.

    Example::

        store: ConversationStore = SQLiteConversationStore(":memory:")
        await store.open()
        try:
            conv = await store.create_conversation("alice", title="New chat")
        finally:
            await store.close()
    """

    async def open(self) -> None:
        """Connect and bring the schema up to date."""
        ...

    async def close(self) -> None:
        """Release the connection; later calls raise :class:`StoreClosedError`."""
        ...

    async def create_conversation(self, owner: str, *, title: str) -> Conversation:
        """Create an empty conversation owned by ``owner``."""
        ...

    async def get_conversation(self, owner: str, conversation_id: str) -> Conversation:
        """Return ``owner``'s conversation ``conversation_id``."""
        ...

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
        """Append a message and move the conversation's ``updated_at`` forward.

        ``role`` must be one of :data:`MESSAGE_ROLES`; ``message_id`` defaults
        to a new id (pass one to store a reply under the id already announced).
        Raises :class:`~tokenwire.errors.InvalidArgumentError` for a bad role or
        message id.
        """
        ...

    async def list_messages(
        self, owner: str, conversation_id: str, *, limit: int | None = None
    ) -> list[StoredMessage]:
        """Return the messages oldest first; with ``limit``, only the newest ``limit``."""
        ...

    async def begin_turn(
        self, owner: str, conversation_id: str, *, title: str, content: str, turn_id: str
    ) -> StoredMessage:
        """Store a turn's user message in one write, creating the conversation first when
        ``conversation_id`` is empty (with ``title``); the message names the conversation.

        Raises NotFoundError as :meth:`add_message` does.
        """
        ...


def new_id(prefix: str) -> str:
    """Mint an opaque, unguessable id such as ``conv_1f0c…`` (prefix, ``_``, 32 hex)."""
    if not re.fullmatch(r"[a-z][a-z0-9]*", prefix):
        raise ValueError(f"id prefix must be a lowercase word like 'conv', got {prefix!r}")
    return f"{prefix}_{uuid.uuid4().hex}"


def is_valid_id(value: str, prefix: str) -> bool:
    """Whether ``value`` has the shape :func:`new_id` gives for ``prefix``."""
    if len(value) > MAX_ID_LENGTH:
        return False
    match = _ID_PATTERN.fullmatch(value)
    return match is not None and match.group("prefix") == prefix


def conversation_not_found(conversation_id: str) -> NotFoundError:
    """The one error for a missing, foreign or malformed conversation id."""
    # Echo only a bounded prefix: the id may be arbitrary client input.
    return NotFoundError(f"conversation {conversation_id[:MAX_ID_LENGTH]!r} not found")


def validate_role(role: str) -> None:
    """Raise InvalidArgumentError unless ``role`` is one of :data:`MESSAGE_ROLES`."""
    if role not in MESSAGE_ROLES:
        allowed = ", ".join(sorted(MESSAGE_ROLES))
        raise InvalidArgumentError(f"message role must be one of {allowed}; got {role[:32]!r}")


def validate_message_id(message_id: str) -> None:
    """Raise InvalidArgumentError unless ``message_id`` is non-empty and short enough."""
    if not message_id or len(message_id) > MAX_ID_LENGTH:
        raise InvalidArgumentError(
            f"message_id must be 1 to {MAX_ID_LENGTH} characters, got {len(message_id)}"
        )


def validate_limit(limit: int | None) -> None:
    """Raise InvalidArgumentError for a negative ``limit`` (``None`` means no limit)."""
    if limit is not None and limit < 0:
        raise InvalidArgumentError(f"limit must be >= 0, got {limit}")
