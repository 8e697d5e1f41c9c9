"""The abuse store contract: flags per account, standings, throttles, tenant policies.

An account is a principal's tenant and user. The store counts each counted flag
(``block`` or ``log``) in a sliding window of :attr:`AbuseRules.window_s` and
decides, in the same atomic step, whether the flag suspends the account; it
answers an account's :class:`Standing` (flags in the window, throttled,
suspended with reason and end). Every operation is one round trip for a remote
store: :meth:`AbuseStore.record` sends a whole batch of flags at once.

A throttled account's turns are counted in a bucket of
``throttle_turns`` per ``throttle_window_s`` (GCRA, as the quota store's rates:
a burst of ``throttle_turns``, then one every ``throttle_window_s /
throttle_turns`` seconds); :meth:`AbuseStore.admit_turn` reads the standing and
takes one turn from the bucket in one step.

Per-tenant moderation policies (category actions and whether flagged text is
kept), set through ``AdminService``, live here too, so every gateway that shares
the store reads the same ones; a version number tells a reader whether anything
changed since it last looked.

    store = MemoryAbuseStore(AbuseRules(window_s=3600, throttle_after=3, suspend_after=10))
    standing = (await store.record([Flag(Account("acme", "alice"), "violence")]))[0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tokenwire.auth.principal import Principal

__all__ = [
    "GOOD_STANDING",
    "AbuseRules",
    "AbuseStore",
    "AbuseStoreError",
    "Account",
    "Flag",
    "Standing",
    "TenantPolicy",
    "suspension_reason",
]

_COUNT_CAP_FLOOR = 100  # the window keeps at least this many flags per account


class AbuseStoreError(Exception):
    """The store could not answer (Redis down, timed out); nothing was changed."""


@dataclass(frozen=True, slots=True)
class Account:
    """Whose flags count together: a principal's tenant and user."""

    tenant: str
    user: str

    @classmethod
    def of(cls, principal: Principal) -> Account:
        """The account of ``principal``."""
        return cls(principal.tenant, principal.user)

    @property
    def name(self) -> str:
        """``tenant/user``, as logs and errors name it."""
        return f"{self.tenant}/{self.user}"


@dataclass(frozen=True, slots=True)
class Flag:
    """One counted flag: whose, and in which category (the suspension reason names it)."""

    account: Account
    category: str


@dataclass(frozen=True, slots=True)
class Standing:
    """An account's standing: its flags in the window, and what follows from them.

    ``suspended_at`` and ``until`` are unix seconds; ``until`` is 0 for a suspension
    that lasts until an admin lifts it (and when not suspended).
    """

    flags: int = 0
    throttled: bool = False
    suspended: bool = False
    reason: str = ""
    suspended_at: float = 0.0
    until: float = 0.0


GOOD_STANDING = Standing()


@dataclass(frozen=True, slots=True)
class AbuseRules:
    """The thresholds a store applies; see :class:`~tokenwire.abuse.AbuseConfig`."""

    window_s: float = 3600.0
    throttle_after: int = 3  # 0: never throttled
    suspend_after: int = 10  # 0: never suspended
    suspend_s: float = 0.0  # 0: until lifted
    throttle_turns: int = 2
    throttle_window_s: float = 60.0

    @property
    def count_cap(self) -> int:
        """Most flags an account's window keeps (the newest): enough to pass every
        threshold, bounded however many flags arrive."""
        return max(_COUNT_CAP_FLOOR, self.throttle_after, self.suspend_after)

    def throttled(self, flags: int) -> bool:
        """Whether ``flags`` in the window throttle an account."""
        return self.throttle_after > 0 and flags >= self.throttle_after

    def suspends(self, flags: int) -> bool:
        """Whether ``flags`` in the window suspend an account."""
        return self.suspend_after > 0 and flags >= self.suspend_after


def suspension_reason(flags: object, window_s: float, category: str) -> str:
    """Why an account was suspended, e.g. ``10 flagged messages within 3600s (latest:
    violence)``; shown to the account's caller and to admins."""
    return f"{flags} flagged messages within {window_s:g}s (latest: {category})"


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """A tenant's moderation policy set at run time: category -> block | log | allow,
    and whether flagged text is kept (None: as configured)."""

    actions: Mapping[str, str] = field(default_factory=dict)
    keep_text: bool | None = None

    @property
    def empty(self) -> bool:
        """True when the policy changes nothing (the configuration applies)."""
        return not self.actions and self.keep_text is None


@runtime_checkable
class AbuseStore(Protocol):
    """Where flags, standings, throttle buckets and tenant policies live; each
    operation is atomic across the store's users and one round trip."""

    async def start(self) -> None:
        """Connect."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    async def record(self, flags: Sequence[Flag]) -> list[Standing]:
        """Count each flag (suspending its account when it reaches the threshold);
        the standing of each flag's account right after it, in order."""
        ...

    async def standing(self, account: Account) -> Standing:
        """The account's standing now."""
        ...

    async def admit_turn(self, account: Account) -> tuple[Standing, float]:
        """The standing, and when the account is throttled (not suspended), one turn
        taken from its bucket: 0.0 when taken, else the seconds until one would be."""
        ...

    async def lift(self, account: Account) -> Standing:
        """End a suspension and forget the account's flags and throttle; the standing
        as it was before."""
        ...

    async def policies(self, known_version: int) -> tuple[int, dict[str, TenantPolicy] | None]:
        """The policies' version and, when it is not ``known_version``, every tenant's
        policy."""
        ...

    async def set_policy(self, tenant: str, policy: TenantPolicy) -> int:
        """Replace ``tenant``'s policy (an empty one removes it); the new version."""
        ...
