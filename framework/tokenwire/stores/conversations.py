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
from typing import Final, Generic, Protocol, TypeVar, runtime_checkable

from tokenwire.errors import AbortedError, InvalidArgumentError, NotFoundError, UnavailableError
from tokenwire.stores.usage import UsageRecord, UsageTotal

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_TITLE_BYTES",
    "MESSAGE_ROLES",
    "BegunTurn",
    "Conversation",
    "ConversationBusyError",
    "ConversationStore",
    "Page",
    "StoreClosedError",
    "StoredMessage",
    "TurnEnd",
    "TurnRecord",
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

MAX_TITLE_BYTES: Final = 200
"""Longest conversation title, in UTF-8 bytes."""

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
    seq: int = 0  # position in the conversation, from 1; 0 when not read back


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One turn as the store knows it: running (its gateway still streams it) or done.

    ``answer`` is the stored answer's text once the turn is done (empty while
    it runs); ``finish_reason`` is a :class:`~tokenwire.backend.FinishReason`
    value, empty while running. A running turn whose gateway stopped beating
    (crashed) is ended by the store when next seen, with finish reason
    ``"error"`` and no answer stored.
    """

    turn_id: str
    conversation_id: str
    user_message_id: str
    answer_id: str
    model: str
    idempotency_key: str
    running: bool
    answer: str = ""
    answer_complete: bool = False
    finish_reason: str = ""
    filter_category: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class BegunTurn:
    """What :meth:`ConversationStore.begin_turn` did.

    ``replayed`` is true when the idempotency key named an earlier turn: then
    nothing was stored and ``turn`` is that earlier turn (running or done);
    otherwise ``turn`` is the new, running turn and ``user_message`` its stored
    user message (for a replay: the earlier turn's).
    """

    turn: TurnRecord
    user_message: StoredMessage
    replayed: bool
    created_conversation: bool = False


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """How a turn ended, for :meth:`ConversationStore.finish_turn`."""

    answer: str  # exactly the text the client was sent
    complete: bool  # false: cut short (cancelled, failed, filtered)
    finish_reason: str
    filter_category: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing and the cursor of the next (empty on the last page)."""

    items: list[T]
    next_cursor: str = ""


class ConversationBusyError(AbortedError):
    """Another turn of the conversation is still running (another device or gateway).

    Maps to ABORTED: retry once that turn has ended.
    """


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
        """Start a turn in one transaction: its user message is stored durably, the
        conversation is created first when ``conversation_id`` is empty (with ``title``),
        and the turn holds the conversation until :meth:`finish_turn`.

        With an ``idempotency_key`` that ``owner`` used before (and that has not
        expired), nothing is stored and the earlier turn comes back with
        ``replayed=True``, whatever conversation or message this call names.

        A replay reports ``created_conversation=False``. A turn that holds the
        conversation on a gateway that stopped beating is ended first (see
        :class:`TurnRecord`), and this one goes ahead.

        Raises NotFoundError as :meth:`add_message` does, and
        :class:`ConversationBusyError` while another live turn holds the conversation.
        """
        ...

    async def finish_turn(
        self, owner: str, conversation_id: str, turn_id: str, answer_id: str, end: TurnEnd
    ) -> bool:
        """End a running turn in one transaction: store its answer under ``answer_id``
        (exactly ``end.answer``, marked incomplete unless ``end.complete``), record how
        it ended, and free the conversation for the next turn.

        False, storing nothing, when the turn is not running any more: its
        conversation was deleted, or it was declared dead (its gateway missed
        heartbeats) and a later turn may already have followed it.
        """
        ...

    async def discard_turn(self, owner: str, conversation_id: str, turn_id: str) -> None:
        """Undo :meth:`begin_turn` for a turn that never started streaming (cancelled
        while it was being stored): its user message, its key, and the conversation
        too if the turn created it. Nothing happens if the turn is not running."""
        ...

    async def get_turn(self, owner: str, turn_id: str) -> TurnRecord:
        """``owner``'s turn ``turn_id``; NotFoundError if missing or foreign."""
        ...

    async def list_conversations(
        self, owner: str, *, page_size: int, cursor: str = ""
    ) -> Page[Conversation]:
        """``owner``'s conversations, most recently updated first; ``cursor`` is a
        previous page's ``next_cursor`` (InvalidArgumentError if it is not one).

        ``page_size`` must be positive (InvalidArgumentError); a store may cap it.
        """
        ...

    async def rename_conversation(
        self, owner: str, conversation_id: str, title: str
    ) -> Conversation:
        """Set the title (at most :data:`MAX_TITLE_BYTES` bytes, InvalidArgumentError
        beyond) and move ``updated_at`` forward.

        Surrounding whitespace is stripped; a title empty after that is InvalidArgumentError.
        """
        ...

    async def delete_conversation(self, owner: str, conversation_id: str) -> None:
        """Delete the conversation, its messages and its turns."""
        ...

    async def page_messages(
        self, owner: str, conversation_id: str, *, page_size: int, cursor: str = ""
    ) -> Page[StoredMessage]:
        """A page of the messages, oldest first; ``cursor`` as in :meth:`list_conversations`."""
        ...

    async def record_usage(self, record: UsageRecord) -> None:
        """Record one turn's usage (see :mod:`tokenwire.stores.usage`); a second record
        of the same turn id is ignored."""
        ...

    async def usage_totals(
        self, *, start: float, end: float, group_by: str, tenant: str = ""
    ) -> list[UsageTotal]:
        """Usage recorded at ``start <= recorded_at < end`` (unix seconds), summed per
        group (``"tenant"``, ``"user"`` or ``"model"``) and model, sorted by key then
        model; with ``tenant``, that tenant's turns only. InvalidArgumentError for an
        empty range or an unknown grouping."""
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
