"""Page cursors of the store listings: opaque to clients, checked on the way back in.

A cursor names the last item of a page by its sort key, so the next page starts
right after it however many rows were added or deleted in between (keyset
pagination: no OFFSET, each page an index range). It is ``v1.`` followed by the
URL-safe base64 of a small JSON object, which also says which listing it came
from, so a cursor of one listing handed to another is refused::

    cursor = conversations_cursor(updated_at=1700000000.5, conversation_id="conv_…")
    after = read_conversations_cursor(cursor)  # (1700000000.5, "conv_…")

A cursor is not signed: it holds nothing secret, and every query it feeds still
filters by owner, so a forged one can only skip around the caller's own rows.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Final

from tokenwire.errors import InvalidArgumentError
from tokenwire.stores.conversations import MAX_ID_LENGTH

__all__ = [
    "MAX_PAGE_SIZE",
    "conversations_cursor",
    "messages_cursor",
    "moderation_events_cursor",
    "page_limit",
    "read_conversations_cursor",
    "read_messages_cursor",
    "read_moderation_events_cursor",
]

MAX_PAGE_SIZE: Final = 1000
"""Most items one page holds; a larger ``page_size`` is cut to this."""

_PREFIX: Final = "v1."
_MAX_CURSOR_LENGTH: Final = 512  # a real cursor is about 150 characters
_CONVERSATIONS: Final = "conversations"
_MESSAGES: Final = "messages"
_EVENTS: Final = "moderation_events"


def page_limit(page_size: int) -> int:
    """``page_size`` checked (InvalidArgumentError unless positive) and capped at
    :data:`MAX_PAGE_SIZE`."""
    if page_size <= 0:
        raise InvalidArgumentError(f"page_size must be positive, got {page_size}")
    return min(page_size, MAX_PAGE_SIZE)


def conversations_cursor(*, updated_at: float, conversation_id: str) -> str:
    """The cursor after a conversation, in the newest-first conversation listing."""
    return _encode({"k": _CONVERSATIONS, "u": updated_at, "i": conversation_id})


def messages_cursor(*, conversation_id: str, seq: int) -> str:
    """The cursor after message ``seq`` of a conversation, in its oldest-first listing."""
    return _encode({"k": _MESSAGES, "c": conversation_id, "s": seq})


def read_conversations_cursor(cursor: str) -> tuple[float, str]:
    """``(updated_at, conversation_id)`` of the last conversation of the previous page.

    Raises InvalidArgumentError for anything :func:`conversations_cursor` did not make.
    """
    fields = _decode(cursor, _CONVERSATIONS)
    updated_at, conversation_id = fields.get("u"), fields.get("i")
    if not (
        isinstance(updated_at, float | int)
        and not isinstance(updated_at, bool)
        and math.isfinite(updated_at)
        and isinstance(conversation_id, str)
        and 0 < len(conversation_id) <= MAX_ID_LENGTH
    ):
        raise _invalid("it is not a conversations page token")
    return float(updated_at), conversation_id


def read_messages_cursor(cursor: str, conversation_id: str) -> int:
    """The ``seq`` of the last message of the previous page of ``conversation_id``.

    Raises InvalidArgumentError for anything :func:`messages_cursor` did not make,
    and for a cursor of another conversation.
    """
    fields = _decode(cursor, _MESSAGES)
    seq = fields.get("s")
    if not (isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**31):
        raise _invalid("it is not a messages page token")
    if fields.get("c") != conversation_id:
        raise _invalid("it belongs to another conversation")
    return seq


def moderation_events_cursor(*, recorded_at: float, event_id: str) -> str:
    """The cursor after an event, in the newest-first moderation event listing."""
    return _encode({"k": _EVENTS, "t": recorded_at, "i": event_id})


def read_moderation_events_cursor(cursor: str) -> tuple[float, str]:
    """``(recorded_at, event_id)`` of the last event of the previous page.

    Raises InvalidArgumentError for anything :func:`moderation_events_cursor` did not make.
    """
    fields = _decode(cursor, _EVENTS)
    recorded_at, event_id = fields.get("t"), fields.get("i")
    if not (
        isinstance(recorded_at, float | int)
        and not isinstance(recorded_at, bool)
        and math.isfinite(recorded_at)
        and isinstance(event_id, str)
        and 0 < len(event_id) <= MAX_ID_LENGTH
    ):
        raise _invalid("it is not a moderation events page token")
    return float(recorded_at), event_id


def _encode(fields: dict[str, object]) -> str:
    raw = json.dumps(fields, separators=(",", ":")).encode()
    return _PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str, kind: str) -> dict[str, object]:
    if len(cursor) > _MAX_CURSOR_LENGTH or not cursor.startswith(_PREFIX):
        raise _invalid("it was not returned by this listing")
    body = cursor[len(_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        fields = json.loads(raw)
    except (binascii.Error, ValueError):  # JSON and UTF-8 errors are ValueErrors
        raise _invalid("it does not decode") from None
    if not isinstance(fields, dict):
        raise _invalid("it does not decode")
    if fields.get("k") != kind:
        raise _invalid(f"it is not a {kind} page token")
    return fields


def _invalid(why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"page_token is not valid: {why}; pass the next_page_token of the previous page,"
        " or nothing for the first page"
    )
