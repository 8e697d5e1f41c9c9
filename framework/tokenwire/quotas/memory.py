"""The in-process quota store: the embedded default, one gateway process only.

Every operation runs without awaiting anything, so on one event loop it is
atomic by construction. State is one float per rate key (GCRA, see
:mod:`tokenwire.quotas.store`) and one set of lease ids per slot key; a process
that dies takes its leases and reservations with it.

    store = MemoryQuotaStore()
    verdict = await store.consume([Rate("u:alice", limit=60, window_s=60.0)], 1)
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence

from tokenwire.quotas.store import (
    ALLOWED,
    Admission,
    Budget,
    BudgetCharge,
    Lease,
    Rate,
    Reservation,
    Slot,
    Verdict,
    retry_delay,
)

__all__ = ["MemoryQuotaStore"]

_EPSILON_S = 1e-9
_SWEEP_EVERY = 4096  # operations between sweeps of drained buckets


class MemoryQuotaStore:
    """Quota counters in this process's memory; ``clock`` is monotonic seconds."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._leases: dict[str, set[str]] = {}
        self._ops = 0
        # Budget counters: key -> [units, expires_at (unix seconds)].
        self._budgets: dict[str, list[float]] = {}
        self._budget_ops = 0

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Forget everything."""
        self._tat.clear()
        self._leases.clear()
        self._budgets.clear()

    def _take(self, rates: Sequence[Rate], cost: int) -> tuple[Verdict, tuple[float, ...]]:
        now = self._clock()
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
            self._sweep(now)
        marks: list[float] = []
        violated: list[int] = []
        worst = 0.0
        for index, rate in enumerate(rates):
            need = cost * rate.interval_s
            new_tat = max(self._tat.get(rate.key, now), now) + need
            excess = new_tat - now - rate.window_s
            if need > rate.window_s + _EPSILON_S:
                excess = math.inf
            if excess > _EPSILON_S:
                violated.append(index)
                worst = max(worst, excess)
            marks.append(new_tat)
        if violated:
            return Verdict(False, retry_delay(worst), tuple(violated)), ()
        for rate, mark in zip(rates, marks, strict=True):
            self._tat[rate.key] = mark
        return ALLOWED, tuple(marks)

    async def consume(self, rates: Sequence[Rate], cost: int) -> Verdict:
        """Take ``cost`` from every rate, or from none."""
        return self._take(rates, cost)[0]

    async def reserve(
        self, rates: Sequence[Rate], amount: int
    ) -> tuple[Verdict, Reservation | None]:
        """Take ``amount`` from every rate, or none; settle the result later."""
        verdict, marks = self._take(rates, amount)
        if not verdict.allowed:
            return verdict, None
        return verdict, Reservation(tuple(rates), amount, marks)

    async def settle(self, reservation: Reservation, actual: int) -> None:
        """Refund what the reservation did not use (while still in the bucket), or charge more."""
        self._settle_now(reservation, actual)

    def _settle_now(self, reservation: Reservation, actual: int) -> None:
        now = self._clock()
        diff = actual - reservation.amount
        if diff == 0:
            return
        for rate, mark in zip(reservation.rates, reservation.marks, strict=True):
            tat = self._tat.get(rate.key)
            if diff < 0:
                if tat is None:
                    continue
                tat -= min(-diff * rate.interval_s, max(0.0, mark - now))
            else:
                tat = max(tat if tat is not None else now, now) + diff * rate.interval_s
            if tat > now:
                self._tat[rate.key] = tat
            else:
                self._tat.pop(rate.key, None)

    async def acquire(self, slots: Sequence[Slot]) -> tuple[Verdict, Lease | None]:
        """One slot on every key, or none."""
        violated = tuple(
            index
            for index, slot in enumerate(slots)
            if len(self._leases.get(slot.key, ())) >= slot.limit
        )
        if violated:
            return Verdict(False, 0.0, violated), None
        lease = Lease(tuple(slots), uuid.uuid4().hex)
        for slot in slots:
            self._leases.setdefault(slot.key, set()).add(lease.lease_id)
        return ALLOWED, lease

    async def release(self, lease: Lease) -> None:
        """Return the lease's slots; idempotent."""
        self._release_now(lease)

    def _release_now(self, lease: Lease) -> None:
        for slot in lease.slots:
            holders = self._leases.get(slot.key)
            if holders is not None:
                holders.discard(lease.lease_id)
                if not holders:
                    del self._leases[slot.key]

    async def admit(
        self, slots: Sequence[Slot], requests: Sequence[Rate], tokens: Sequence[Rate], amount: int
    ) -> Admission:
        """Slots, then one request, then ``amount`` tokens: all, or refused at a stage."""
        busy = tuple(
            index
            for index, slot in enumerate(slots)
            if len(self._leases.get(slot.key, ())) >= slot.limit
        )
        if busy:
            return Admission(Verdict(False, 0.0, busy), "streams")
        verdict, _ = self._take(requests, 1)
        if not verdict.allowed:
            return Admission(verdict, "requests")
        verdict, marks = self._take(tokens, amount)
        if not verdict.allowed:
            return Admission(verdict, "tokens")
        _, lease = await self.acquire(slots) if slots else (ALLOWED, None)
        reservation = Reservation(tuple(tokens), amount, marks) if tokens else None
        return Admission(ALLOWED, "", lease, reservation)

    def finish(self, lease: Lease | None, reservation: Reservation | None, actual: int) -> None:
        """Settle and release at once (nothing here is remote)."""
        if reservation is not None:
            self._settle_now(reservation, actual)
        if lease is not None:
            self._release_now(lease)

    async def used(self, rate: Rate) -> float:
        """Units the bucket still counts."""
        tat = self._tat.get(rate.key)
        return 0.0 if tat is None else max(0.0, tat - self._clock()) / rate.interval_s

    async def in_use(self, slot: Slot) -> int:
        """Live leases on the slot's key."""
        return len(self._leases.get(slot.key, ()))

    async def charge_budget(self, budget: Budget, amount: int) -> tuple[int, BudgetCharge | None]:
        """Add ``amount`` to the period's counter unless it would pass the limit."""
        self._budget_ops += 1
        if self._budget_ops % _SWEEP_EVERY == 0:
            now = time.time()
            for key in [k for k, (_, until) in self._budgets.items() if until <= now]:
                del self._budgets[key]
        counter = self._counter(budget.key)
        used = int(counter[0]) if counter is not None else 0
        if used + amount > budget.limit:
            return used, None
        if counter is None:
            counter = self._budgets[budget.key] = [0, budget.expires_at]
        counter[0] = used + amount
        if budget.expires_at <= time.time():  # as Redis does with an expiry in the past
            del self._budgets[budget.key]
        return used + amount, BudgetCharge(budget, amount)

    def settle_budget(self, charge: BudgetCharge, actual: int) -> None:
        """Correct the charge to ``actual``; nothing once the counter is gone."""
        counter = self._counter(charge.budget.key)
        if counter is not None:
            counter[0] = max(0, int(counter[0]) + actual - charge.amount)

    async def budget_used(self, budget: Budget) -> int:
        """Units the period's counter holds."""
        counter = self._counter(budget.key)
        return 0 if counter is None else int(counter[0])

    def _counter(self, key: str) -> list[float] | None:
        # Expiry is unix time (Budget.expires_at), so the wall clock, not self._clock.
        counter = self._budgets.get(key)
        if counter is not None and counter[1] <= time.time():
            del self._budgets[key]
            return None
        return counter

    def _sweep(self, now: float) -> None:
        for key in [key for key, tat in self._tat.items() if tat <= now]:
            del self._tat[key]
