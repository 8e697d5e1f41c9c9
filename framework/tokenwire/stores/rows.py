"""What the SQL stores share: row shapes, argument checks and the errors they raise.

Both :class:`~tokenwire.stores.sqlite.SQLiteConversationStore` and
:class:`~tokenwire.stores.postgres.PostgresConversationStore` keep a
``turn_records`` view with the columns of :data:`TURN_RECORD_COLUMNS` (a turn,
its answer's text and its user message), and read messages back with
:data:`MESSAGE_COLUMNS`, so one set of functions here turns their rows into the
contract's dataclasses, and both stores answer bad input with the same errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from tokenwire.errors import InvalidArgumentError, NotFoundError
from tokenwire.stores.conversations import (
    MAX_ID_LENGTH,
    MAX_TITLE_BYTES,
    BegunTurn,
    ConversationBusyError,
    StoredMessage,
    TurnRecord,
)

__all__ = [
    "DEAD_TURN_REASON",
    "MAX_KEY_BYTES",
    "MESSAGE_COLUMNS",
    "TURN_RECORD_COLUMNS",
    "begun_from_row",
    "busy",
    "check_title",
    "check_turn_ids",
    "message_from_row",
    "turn_from_row",
    "turn_not_found",
]

MAX_KEY_BYTES: Final = 256
"""Longest idempotency key a store takes (the API allows 128 bytes; this is a backstop)."""

DEAD_TURN_REASON: Final = "error"
"""The finish reason of a turn ended because its gateway stopped beating."""

MESSAGE_COLUMNS: Final = "id, conversation_id, role, content, created_at, turn_id, complete, seq"
"""The message columns, in the order :func:`message_from_row` reads them."""

TURN_RECORD_COLUMNS: Final = (
    "turn_id, conversation_id, user_message_id, answer_id, model, idempotency_key, running,"
    " answer, answer_complete, finish_reason, filter_category, prompt_tokens,"
    " completion_tokens, created_at, user_seq, user_content, user_created_at, user_complete"
)
"""The ``turn_records`` view's columns, in the order :func:`turn_from_row` reads them."""

_Row = Sequence[Any]


def message_from_row(row: _Row) -> StoredMessage:
    """A :class:`StoredMessage` from a row of :data:`MESSAGE_COLUMNS`."""
    return StoredMessage(
        id=row[0],
        conversation_id=row[1],
        role=row[2],
        content=row[3],
        created_at=row[4],
        turn_id=row[5],
        complete=bool(row[6]),
        seq=row[7],
    )


def turn_from_row(row: _Row, *, ended: bool = False) -> TurnRecord:
    """A :class:`TurnRecord` from a row of :data:`TURN_RECORD_COLUMNS`.

    ``ended``: the row was read just before the turn was declared dead, so it is
    reported done with :data:`DEAD_TURN_REASON` and no answer.
    """
    running = bool(row[6]) and not ended
    return TurnRecord(
        turn_id=row[0],
        conversation_id=row[1],
        user_message_id=row[2],
        answer_id=row[3],
        model=row[4],
        idempotency_key=row[5],
        running=running,
        answer=row[7],
        answer_complete=bool(row[8]),
        finish_reason=DEAD_TURN_REASON if ended else row[9],
        filter_category=row[10],
        prompt_tokens=row[11],
        completion_tokens=row[12],
        created_at=row[13],
    )


def begun_from_row(row: _Row, *, replayed: bool, created_conversation: bool = False) -> BegunTurn:
    """A :class:`BegunTurn` from a row of :data:`TURN_RECORD_COLUMNS`."""
    turn = turn_from_row(row)
    message = StoredMessage(
        id=turn.user_message_id,
        conversation_id=turn.conversation_id,
        role="user",
        content=row[15],
        created_at=row[16],
        turn_id=turn.turn_id,
        complete=bool(row[17]),
        seq=row[14],
    )
    return BegunTurn(turn, message, replayed, created_conversation)


def check_turn_ids(turn_id: str, answer_id: str, idempotency_key: str) -> None:
    """InvalidArgumentError unless both ids are 1 to :data:`MAX_ID_LENGTH` characters and
    the key at most :data:`MAX_KEY_BYTES` bytes of UTF-8."""
    for name, value in (("turn_id", turn_id), ("answer_id", answer_id)):
        if not value or len(value) > MAX_ID_LENGTH:
            raise InvalidArgumentError(
                f"{name} must be 1 to {MAX_ID_LENGTH} characters, got {len(value)}"
            )
    if len(idempotency_key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidArgumentError(f"idempotency_key must be at most {MAX_KEY_BYTES} bytes")


def check_title(title: str) -> str:
    """The title without surrounding whitespace; InvalidArgumentError if that is empty
    or longer than :data:`MAX_TITLE_BYTES` bytes of UTF-8."""
    stripped = title.strip()
    if not stripped:
        raise InvalidArgumentError("title must not be empty")
    try:
        size = len(stripped.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgumentError("title must be valid UTF-8") from None
    if size > MAX_TITLE_BYTES:
        raise InvalidArgumentError(
            f"title must be at most {MAX_TITLE_BYTES} bytes of UTF-8, got {size}"
        )
    return stripped


def turn_not_found(turn_id: str) -> NotFoundError:
    """The one error for a missing or foreign turn (the id echoed only up to a bound)."""
    return NotFoundError(f"turn {turn_id[:MAX_ID_LENGTH]!r} not found")


def busy(conversation_id: str, running_turn_id: str) -> ConversationBusyError:
    """The error for a conversation that a live turn still holds."""
    return ConversationBusyError(
        f"conversation {conversation_id[:MAX_ID_LENGTH]!r} is busy: turn"
        f" {running_turn_id!r} is still running; retry once it has finished"
    )
