"""The in-process abuse store: the embedded default, one gateway process only.

No operation awaits anything, so on one event loop each is atomic by
construction. Per account: the times of its counted flags (the newest
:attr:`~tokenwire.abuse.store.AbuseRules.count_cap`), its suspension, and its
throttle bucket (one number, GCRA). A process that stops forgets them all.

    store = MemoryAbuseStore(AbuseRules(throttle_after=3, suspend_after=10))
    standing = (await store.record([Flag(Account("acme", "alice"), "violence")]))[0]
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenwire.abuse.store import (
    AbuseRules,
    Account,
    Flag,
    Standing,
    TenantPolicy,
    suspension_reason,
)
from tokenwire.quotas.store import retry_delay

__all__ = ["MemoryAbuseStore"]

_EPSILON_S = 1e-9
_SWEEP_EVERY = 4096  # operations between sweeps of accounts with nothing left


@dataclass(slots=True)
class _Suspension:
    reason: str
    since: float
    until: float  # 0: until lifted


class MemoryAbuseStore:
    """Abuse counters in this process's memory; ``clock`` gives unix seconds."""

    def __init__(self, rules: AbuseRules, *, clock: Callable[[], float] = time.time) -> None:
        self.rules = rules
        self._clock = clock
        self._flags: dict[Account, deque[float]] = {}
        self._suspended: dict[Account, _Suspension] = {}
        self._tat: dict[Account, float] = {}  # throttle buckets: theoretical arrival time
        self._policies: dict[str, TenantPolicy] = {}
        self._version = 0
        self._ops = 0

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Forget everything but the policies."""
        self._flags.clear()
        self._suspended.clear()
        self._tat.clear()

    async def record(self, flags: Sequence[Flag]) -> list[Standing]:
        """Count each flag; suspend its account at ``suspend_after``."""
        standings = []
        for flag in flags:
            now = self._clock()
            times = self._window(flag.account, now, create=True)
            assert times is not None
            times.append(now)
            count = len(times)
            if self.rules.suspends(count) and self._suspension(flag.account, now) is None:
                until = now + self.rules.suspend_s if self.rules.suspend_s else 0.0
                reason = suspension_reason(count, self.rules.window_s, flag.category)
                self._suspended[flag.account] = _Suspension(reason, now, until)
            standings.append(self._standing(flag.account, now))
        return standings

    async def standing(self, account: Account) -> Standing:
        """The account's standing now."""
        return self._standing(account, self._clock())

    async def admit_turn(self, account: Account) -> tuple[Standing, float]:
        """The standing, and a turn taken from a throttled account's bucket."""
        now = self._clock()
        standing = self._standing(account, now)
        if standing.suspended or not standing.throttled:
            return standing, 0.0
        rules = self.rules
        interval = rules.throttle_window_s / rules.throttle_turns
        tat = max(self._tat.get(account, now), now) + interval
        excess = tat - now - rules.throttle_window_s
        if excess > _EPSILON_S:
            return standing, retry_delay(excess)
        self._tat[account] = tat
        return standing, 0.0

    async def lift(self, account: Account) -> Standing:
        """End the suspension, forget the flags and the throttle; the standing before."""
        before = self._standing(account, self._clock())
        self._flags.pop(account, None)
        self._suspended.pop(account, None)
        self._tat.pop(account, None)
        return before

    async def policies(self, known_version: int) -> tuple[int, dict[str, TenantPolicy] | None]:
        """The version, and every policy when it changed."""
        if known_version == self._version:
            return self._version, None
        return self._version, dict(self._policies)

    async def set_policy(self, tenant: str, policy: TenantPolicy) -> int:
        """Replace ``tenant``'s policy (empty: remove it)."""
        if policy.empty:
            self._policies.pop(tenant, None)
        else:
            self._policies[tenant] = TenantPolicy(dict(policy.actions), policy.keep_text)
        self._version += 1
        return self._version

    def _window(self, account: Account, now: float, *, create: bool) -> deque[float] | None:
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
            self._sweep(now)
        times = self._flags.get(account)
        if times is None:
            if not create:
                return None
            times = self._flags[account] = deque(maxlen=self.rules.count_cap)
        start = now - self.rules.window_s
        while times and times[0] <= start:
            times.popleft()
        return times

    def _suspension(self, account: Account, now: float) -> _Suspension | None:
        suspension = self._suspended.get(account)
        if suspension is not None and suspension.until and suspension.until <= now:
            del self._suspended[account]
            return None
        return suspension

    def _standing(self, account: Account, now: float) -> Standing:
        times = self._window(account, now, create=False)
        count = len(times) if times is not None else 0
        suspension = self._suspension(account, now)
        if suspension is None:
            return Standing(count, self.rules.throttled(count))
        return Standing(
            count,
            self.rules.throttled(count),
            True,
            suspension.reason,
            suspension.since,
            suspension.until,
        )

    def _sweep(self, now: float) -> None:
        start = now - self.rules.window_s
        for account in [a for a, times in self._flags.items() if not times or times[-1] <= start]:
            del self._flags[account]
        for account in [a for a, tat in self._tat.items() if tat <= now]:
            del self._tat[account]
