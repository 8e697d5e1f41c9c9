"""The quota store contract: rate buckets and stream slots, checked and taken atomically.

Rates use GCRA, the generic cell rate algorithm (a token bucket kept as one
number per key). A rate of ``limit`` units per ``window_s`` is a bucket that holds
``limit`` units and refills evenly, one unit every ``window_s / limit`` seconds:
a burst of ``limit`` is admitted at once, then the bucket admits as fast as it
refills. The store keeps, per key, the *theoretical arrival time* (TAT): the
moment the bucket will be empty again. A cost ``n`` is admitted when
``max(TAT, now) + n * interval - now <= window_s``; otherwise the retry delay is
that excess, which is exact: after waiting it (and with no other traffic on the
key) the same cost is admitted. Delays are rounded up to the millisecond so a
client that waits exactly the advertised delay is never refused by a rounding
error. A cost larger than the whole limit can never be admitted
(``retry_after_s`` is ``math.inf``).

Several rates (a principal's and its tenant's) are checked as one: either every
bucket takes the cost or none does, and the retry delay is the largest of the
refusing buckets' delays (each bucket only refills while the caller waits).

Tokens are *reserved* at the most a turn may use and *settled* to what it used:
the difference is refunded (or charged, when more was used). A reservation that
is never settled, because its gateway died, stays charged at the reserved
amount and drains out of the bucket like any use, within one window; nothing is
held forever. A refund only returns the part of the reservation still in the
bucket (the rest has drained already), so settling late never mints capacity.

Budgets are plain counters for a fixed period (a tenant's tokens per day or
month): ``charge_budget`` adds an amount unless the total would pass the
limit, and the counter disappears when the period is over (``Budget.expires_at``;
the period is part of its key, so a new period starts at 0). A charge is a
reservation too: ``settle_budget`` corrects it to what was used, without waiting,
and a settlement that arrives after its period ended changes nothing. See
:class:`BudgetStore`; both stores implement it.

Stream slots are leases: ``acquire`` takes one slot on every key (all or none)
and returns a :class:`Lease`; ``release`` (idempotent) returns them. The
in-memory store's leases die with its process; the Redis store's expire unless
their gateway keeps renewing them, see :mod:`tokenwire.quotas.redis`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "ALLOWED",
    "Admission",
    "Budget",
    "BudgetCharge",
    "BudgetStore",
    "Lease",
    "QuotaStore",
    "QuotaStoreError",
    "Rate",
    "Reservation",
    "Slot",
    "Verdict",
    "retry_delay",
    "tenant_tag",
]


class QuotaStoreError(Exception):
    """The store could not answer (Redis down, timed out); nothing was counted."""


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` units per ``window_s`` seconds on ``key``."""

    key: str
    limit: int
    window_s: float

    @property
    def interval_s(self) -> float:
        """Seconds the bucket takes to refill one unit."""
        return self.window_s / self.limit


@dataclass(frozen=True, slots=True)
class Slot:
    """At most ``limit`` leases at once on ``key``."""

    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a check passed; if not, how long until it would, and which limits refused.

    ``violated`` holds indexes into the rates or slots that were checked.
    ``retry_after_s`` is ``math.inf`` when the cost can never fit, and 0 for
    slots (a slot frees when some stream ends, which no store can foresee).
    """

    allowed: bool
    retry_after_s: float = 0.0
    violated: tuple[int, ...] = ()


ALLOWED = Verdict(True)


@dataclass(frozen=True, slots=True)
class Reservation:
    """Units taken from some rates, to be settled; ``marks`` are the store's own."""

    rates: tuple[Rate, ...]
    amount: int
    marks: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Lease:
    """Stream slots held under one id until released."""

    slots: tuple[Slot, ...]
    lease_id: str


@dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`QuotaStore.admit` did: took everything, or refused at one stage.

    ``refused`` names the stage ("streams", "requests" or "tokens"; empty: admitted)
    and ``verdict`` its verdict, whose ``violated`` indexes that stage's items.
    """

    verdict: Verdict
    refused: str = ""
    lease: Lease | None = None
    reservation: Reservation | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``limit`` units on ``key`` until ``expires_at`` (unix seconds), when the
    counter is dropped; ``key`` names the period, so the next period starts afresh."""

    key: str
    limit: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class BudgetCharge:
    """``amount`` units charged to ``budget``, to be settled."""

    budget: Budget
    amount: int


def retry_delay(excess_s: float) -> float:
    """An excess in seconds as an advertised delay: rounded up to the millisecond, > 0."""
    if math.isinf(excess_s):
        return math.inf
    return max(0.001, math.ceil(round(excess_s * 1000, 6)) / 1000)


def tenant_tag(tenant: str) -> str:
    """``tenant`` as a Redis Cluster hash tag (``{...}``, with ``%``, ``{`` and ``}``
    escaped): every key of a tenant (quotas, budgets, abuse counts) carries it, so
    they share one slot and each script touches one slot."""
    return "{" + tenant.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") + "}"


@runtime_checkable
class QuotaStore(Protocol):
    """Where quota counters live; every check-and-take is atomic across its users."""

    async def start(self) -> None:
        """Connect (and start background work such as renewing leases)."""
        ...

    async def close(self) -> None:
        """Release live leases and connections."""
        ...

    async def consume(self, rates: Sequence[Rate], cost: int) -> Verdict:
        """Take ``cost`` from every rate, or from none and say when it would fit."""
        ...

    async def reserve(
        self, rates: Sequence[Rate], amount: int
    ) -> tuple[Verdict, Reservation | None]:
        """Like :meth:`consume`, remembering enough to :meth:`settle` later."""
        ...

    async def settle(self, reservation: Reservation, actual: int) -> None:
        """Correct a reservation to ``actual`` units: refund or charge the difference."""
        ...

    async def acquire(self, slots: Sequence[Slot]) -> tuple[Verdict, Lease | None]:
        """Take one slot on every key, or none."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give a lease's slots back; releasing twice is harmless."""
        ...

    async def admit(
        self, slots: Sequence[Slot], requests: Sequence[Rate], tokens: Sequence[Rate], amount: int
    ) -> Admission:
        """A turn's whole admission in one step (one round trip for a remote store):
        a slot on every key, one unit of every request rate, ``amount`` of every
        token rate. Refused on slots or requests, nothing is taken; refused on
        tokens, the request still counts (as ``consume`` then ``reserve`` would)."""
        ...

    def finish(self, lease: Lease | None, reservation: Reservation | None, actual: int) -> None:
        """Settle ``reservation`` to ``actual`` and release ``lease``, without waiting:
        a remote store sends both with its next call, or within milliseconds."""
        ...

    async def used(self, rate: Rate) -> float:
        """Units currently in ``rate``'s bucket (what the window still counts)."""
        ...

    async def in_use(self, slot: Slot) -> int:
        """Live leases on ``slot``'s key."""
        ...


@runtime_checkable
class BudgetStore(Protocol):
    """Per-period counters beside the quota buckets: one atomic check-and-add per charge.

    :class:`~tokenwire.quotas.MemoryQuotaStore` and
    :class:`~tokenwire.quotas.RedisQuotaStore` are both budget stores, so a budget is
    shared by the same processes that share the quotas.
    """

    async def start(self) -> None:
        """Connect (as :meth:`QuotaStore.start`)."""
        ...

    async def close(self) -> None:
        """Send what is pending and release connections (as :meth:`QuotaStore.close`)."""
        ...

    async def charge_budget(self, budget: Budget, amount: int) -> tuple[int, BudgetCharge | None]:
        """Add ``amount`` unless the total would pass ``budget.limit``. Returns the units
        counted (after the charge; when refused, as they stand) and the charge, or None
        when refused (nothing was added)."""
        ...

    def settle_budget(self, charge: BudgetCharge, actual: int) -> None:
        """Correct ``charge`` to ``actual`` units without waiting (a remote store sends it
        with its next call, or within milliseconds); never below 0, and nothing once
        the period's counter is gone."""
        ...

    async def budget_used(self, budget: Budget) -> int:
        """Units counted on ``budget`` now (settlements sent first)."""
        ...
