"""Flagged moderation events, kept in the conversation database for admins to list.

Every moderation flag (whatever its action: block, log or allow) becomes one
:class:`ModerationEventRecord`, written in batches off the turn's path by the
abuse monitor (:mod:`tokenwire.abuse`). ``text`` is empty unless the tenant's
policy keeps flagged text. Both SQL stores keep them in a ``moderation_events``
table and list them newest first, a page at a time::

    await store.record_moderation_events([ModerationEventRecord(new_id("flag"), time.time(),
        "acme", "alice", "turn_…", "input", "violence", "rules", 1.0, "block", "")])
    page = await store.list_moderation_events(ModerationEventQuery(tenant="acme", page_size=50))

This is a contract of its own, beside :class:`~tokenwire.stores.ConversationStore`:
a store that does not keep events (a test double, a store of another program)
still serves chat; the server then lists no events.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tokenwire.errors import InvalidArgumentError
from tokenwire.stores.conversations import Page

__all__ = [
    "ModerationEventQuery",
    "ModerationEventRecord",
    "ModerationEventStore",
    "check_event_query",
]


@dataclass(frozen=True, slots=True)
class ModerationEventRecord:
    """One flagged check: when, whose, which turn and way, what, by whom, what followed."""

    event_id: str  # "flag_…", minted when the flag was heard
    recorded_at: float  # unix seconds
    tenant: str
    user: str
    turn_id: str
    direction: str  # "input" or "output"
    category: str
    moderator: str
    score: float
    action: str  # block, log or allow
    text: str  # empty unless the tenant keeps flagged text


@dataclass(frozen=True, slots=True)
class ModerationEventQuery:
    """Which events to list: a tenant (and a user of it), a time range, a page."""

    tenant: str = ""  # empty: every tenant
    user: str = ""  # needs tenant: user names are per tenant
    since: float | None = None  # recorded_at >= since
    until: float | None = None  # recorded_at < until
    page_size: int = 50
    cursor: str = ""  # a previous page's next_cursor


def check_event_query(query: ModerationEventQuery) -> None:
    """InvalidArgumentError for a user without a tenant, or an empty or non-finite range."""
    if query.user and not query.tenant:
        raise InvalidArgumentError("a user filter needs its tenant: user names are per tenant")
    for name in ("since", "until"):
        value = getattr(query, name)
        if value is not None and not math.isfinite(value):
            raise InvalidArgumentError(f"{name} must be a finite time")
    if query.since is not None and query.until is not None and query.since >= query.until:
        raise InvalidArgumentError("the range must end after it starts (since < until)")


@runtime_checkable
class ModerationEventStore(Protocol):
    """Where flagged moderation events are kept: the SQLite and PostgreSQL stores."""

    async def record_moderation_events(self, events: Sequence[ModerationEventRecord]) -> None:
        """Write a batch of events in one transaction; an id already kept is ignored."""
        ...

    async def list_moderation_events(
        self, query: ModerationEventQuery
    ) -> Page[ModerationEventRecord]:
        """A page of the events ``query`` selects, newest first; InvalidArgumentError for
        a bad query or page token."""
        ...
