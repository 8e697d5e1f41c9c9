"""The usage half of the conversation store contract: one row per turn, summed on demand.

Every turn that reached the engine is recorded once, with its tokens and who
ran it (:class:`UsageRecord`); :meth:`~tokenwire.stores.ConversationStore.usage_totals`
sums the rows of a time range per group and model (:class:`UsageTotal`), from
which :mod:`tokenwire.usage` prices each group::

    await store.record_usage(UsageRecord("turn_…", "acme", "alice", "key_…", "smollm2",
                                         "stop", 12, 30, recorded_at=time.time()))
    totals = await store.usage_totals(start=day_start, end=day_end, group_by="tenant")

Both SQL stores keep the rows in a ``usage_records`` table, keyed by turn id, so
recording a turn twice keeps the first row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from tokenwire.errors import InvalidArgumentError

__all__ = ["USAGE_GROUPS", "UsageRecord", "UsageTotal", "check_usage_query"]

USAGE_GROUPS: Final = ("tenant", "user", "model")
"""What usage may be grouped by. A user's key is ``tenant/user``: user names are per tenant."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One turn's usage: who ran it, on which model, how it ended and its tokens."""

    turn_id: str
    tenant: str
    user: str
    api_key_id: str  # the API key the call authenticated with; empty for JWT, mTLS, anonymous
    model: str
    finish_reason: str  # a FinishReason value: "stop", "length", "cancelled", ...
    prompt_tokens: int
    completion_tokens: int
    recorded_at: float  # unix seconds, when the turn ended


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """The summed usage of one group on one model (a group spanning models has a row each)."""

    key: str  # the tenant, "tenant/user", or the model, as grouped
    model: str
    turns: int
    prompt_tokens: int
    completion_tokens: int


def check_usage_query(start: float, end: float, group_by: str) -> None:
    """InvalidArgumentError unless ``start < end`` (both finite) and ``group_by`` is known."""
    if group_by not in USAGE_GROUPS:
        raise InvalidArgumentError(
            f"usage can be grouped by {', '.join(USAGE_GROUPS)}; got {group_by[:32]!r}"
        )
    if not (math.isfinite(start) and math.isfinite(end)):
        raise InvalidArgumentError("the usage range needs a finite start and end")
    if start >= end:
        raise InvalidArgumentError(
            f"the usage range must end after it starts (start {start!r}, end {end!r})"
        )
