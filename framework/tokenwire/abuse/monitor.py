"""The abuse monitor: hears every flag, keeps each principal's standing, answers from memory.

:class:`AbuseMonitor` is moderation's :class:`~tokenwire.moderation.actions.FlagSink`
and :class:`~tokenwire.moderation.actions.TenantOverrides`, and what the
suspension interceptor and the throttle policy ask about a principal:

* **a flag** (:meth:`AbuseMonitor.flagged`, on the event loop, mid-turn) is queued
  for the conversation database (every flag) and, when its action counts
  (``block`` or ``log``), for the abuse store; the principal's cached standing
  counts it at once (a suspension it causes applies on this gateway before the
  store has answered). A sender task records the queued flags in one store call
  (one round trip) and replaces the cached standings with the store's answer;
* **a standing** is read from the cache while it is younger than
  ``abuse.standing_cache_s``, so a call costs no round trip then; a stale one is
  read again (concurrent calls of one principal share one read);
* a store that does not answer is logged; with ``abuse.fail_open`` calls are
  served on the last known standing, without it they are UNAVAILABLE.

    monitor = AbuseMonitor(config.abuse, MemoryAbuseStore(config.abuse.rules))
    await monitor.start()
    await monitor.check(principal)       # AccountSuspendedError when suspended
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from tokenwire.abuse.config import AbuseConfig
from tokenwire.abuse.events import FlagEventLog
from tokenwire.abuse.overrides import TenantPolicies
from tokenwire.abuse.refusals import AccountSuspendedError, AccountThrottledError
from tokenwire.abuse.store import (
    GOOD_STANDING,
    AbuseStore,
    AbuseStoreError,
    Account,
    Flag,
    Standing,
    TenantPolicy,
    suspension_reason,
)
from tokenwire.auth.principal import Principal
from tokenwire.errors import ConfigError, UnavailableError
from tokenwire.logs import get_logger
from tokenwire.moderation.actions import BLOCK, LOG, FlagEvent
from tokenwire.stores.conversations import Page
from tokenwire.stores.moderation_events import (
    ModerationEventQuery,
    ModerationEventRecord,
    ModerationEventStore,
)

__all__ = ["COUNTED_ACTIONS", "AbuseMonitor"]

COUNTED_ACTIONS: Final = frozenset({BLOCK, LOG})
"""The flag actions that count against a principal (``allow`` is listed, not counted)."""

_log = get_logger("tokenwire.abuse")
_audit = get_logger("tokenwire.audit")
_CACHE_LIMIT: Final = 100_000  # principals whose standing is kept
_STORE_RETRY_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class _Entry:
    standing: Standing
    read_at: float  # monotonic
    confirmed: bool  # the store's answer (not a local count on top of one)


class AbuseMonitor:
    """Flags, standings and tenant policies over ``store``; see the module docstring.

    ``events`` keeps every flag for listing (None: nowhere). ``owns_store``: the
    monitor starts and closes ``store``. ``clock`` is monotonic seconds, ``wall``
    unix seconds.
    """

    def __init__(
        self,
        config: AbuseConfig,
        store: AbuseStore,
        *,
        events: ModerationEventStore | None = None,
        owns_store: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.rules = config.rules
        self.store = store
        self.events = FlagEventLog(events, clock=wall)
        self.policies = TenantPolicies(store, refresh_s=config.policy_refresh_s)
        self._owns_store = owns_store
        self._clock = clock
        self._wall = wall
        self._cache: dict[Account, _Entry] = {}
        # Bumped by every local change of an account (a flag heard, a lift): a read that
        # began before it is older than the cache and is not kept.
        self._epochs: dict[Account, int] = {}
        self._reads: dict[Account, asyncio.Future[Standing]] = {}
        self._pending: list[Flag] = []
        # Flags heard but not yet answered by the store, per account: a read of the
        # account waits for them, or it would answer a count without them.
        self._unconfirmed: dict[Account, int] = {}
        self._sender: asyncio.Task[None] | None = None
        self._started = False

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect the store and load the tenant policies; safe to call twice.

        An unreachable store is a ConfigError unless ``abuse.fail_open``."""
        if self._started:
            return
        self._started = True
        if self._owns_store:
            try:
                await self.store.start()
            except AbuseStoreError as exc:
                if not self.config.fail_open:
                    raise ConfigError(
                        f"the abuse store is unreachable at start-up ({exc}); fix "
                        "abuse.redis_url (or quotas.redis_url), or set abuse.fail_open = true"
                    ) from exc
                _log.warning("abuse store unreachable at start; serving regardless", error=str(exc))
        await self.policies.start()

    async def close(self) -> None:
        """Send the flags and write the events still pending, then release the store."""
        if not self._started:
            return
        self._started = False
        await self.policies.close()
        while self._sender is not None:
            await asyncio.shield(self._sender)
        await self.events.close()
        if self._owns_store:
            await self.store.close()

    # --- FlagSink and TenantOverrides --------------------------------------------

    def flagged(self, event: FlagEvent) -> None:
        """Keep ``event``; count it against its principal when its action counts."""
        self.events.add(event)
        if event.action not in COUNTED_ACTIONS:
            return
        account = Account.of(event.principal)
        entry = self._cache.get(account)
        before = entry.standing if entry is not None else GOOD_STANDING
        # Counted on top of what was read, and fresh only as long as that read is: an
        # account this gateway knew nothing of is read again (after the flag is sent).
        read_at = entry.read_at if entry is not None else -math.inf
        counted = self._counted(before, 1, event.category)
        self._put(account, counted, confirmed=False, read_at=read_at)
        self._epochs[account] = self._epochs.get(account, 0) + 1
        self._unconfirmed[account] = self._unconfirmed.get(account, 0) + 1
        self._pending.append(Flag(account, event.category))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_flags())

    def tenant_actions(self, tenant: str) -> Mapping[str, str] | None:
        """The tenant's category actions set through AdminService, or None; from memory."""
        return self.policies.tenant_actions(tenant)

    def keeps_text(self, tenant: str) -> bool | None:
        """Whether the tenant keeps flagged text (None: as configured); from memory."""
        return self.policies.keeps_text(tenant)

    # --- standings ---------------------------------------------------------------

    def cached(self, principal: Principal) -> Standing | None:
        """The principal's standing if the cache holds a fresh one, else None."""
        entry = self._cache.get(Account(principal.tenant, principal.user))
        if entry is None or self._clock() - entry.read_at >= self.config.standing_cache_s:
            return None
        standing = entry.standing
        if standing.suspended and standing.until and standing.until <= self._wall():
            return None  # a timed suspension ended: ask the store
        return standing

    async def standing(self, principal: Principal) -> Standing:
        """The principal's standing: from the cache while fresh, else read (shared)."""
        cached = self.cached(principal)
        if cached is not None:
            return cached
        account = Account.of(principal)
        read = self._reads.get(account)
        if read is None:
            read = asyncio.ensure_future(self._read(account))
            self._reads[account] = read
            read.add_done_callback(lambda done: self._read_done(account, done))
        return await asyncio.shield(read)

    async def check(self, principal: Principal) -> Standing:
        """The principal's standing; AccountSuspendedError (PERMISSION_DENIED) when suspended."""
        standing = self.cached(principal) or await self.standing(principal)
        if standing.suspended:
            raise AccountSuspendedError(standing)
        return standing

    async def admit_turn(self, principal: Principal) -> None:
        """Refuse a suspended principal's turn, and a throttled one's beyond its rate
        (AccountThrottledError, RESOURCE_EXHAUSTED with the delay); one round trip only
        while the principal is throttled."""
        standing = await self.check(principal)
        if not standing.throttled:
            return
        account = Account.of(principal)
        await self._flags_sent(account)
        epoch = self._epochs.get(account, 0)
        try:
            standing, retry_s = await self.store.admit_turn(account)
        except AbuseStoreError as exc:
            self._store_down(exc)
            return
        if self._epochs.get(account, 0) == epoch:
            self._put(account, standing, confirmed=True)
        if standing.suspended:
            raise AccountSuspendedError(standing)
        if retry_s > 0:
            rules = self.rules
            raise AccountThrottledError(
                account, standing, rules.throttle_turns, rules.throttle_window_s, retry_s
            )

    # --- administration ------------------------------------------------------------

    async def account_standing(self, tenant: str, user: str) -> Standing:
        """The account's standing as the store holds it now."""
        account = Account(tenant, user)
        try:
            standing = await self.store.standing(account)
        except AbuseStoreError as exc:
            raise _unavailable(exc) from exc
        self._put(account, standing, confirmed=True)
        return standing

    async def lift(self, tenant: str, user: str, *, by: str) -> Standing:
        """End the account's suspension and forget its flags; its standing before."""
        account = Account(tenant, user)
        try:
            before = await self.store.lift(account)
        except AbuseStoreError as exc:
            raise _unavailable(exc) from exc
        self._epochs[account] = self._epochs.get(account, 0) + 1
        self._put(account, GOOD_STANDING, confirmed=True)
        _audit.warning(
            "account suspension lifted",
            account_tenant=tenant,
            account_user=user,
            was_suspended=before.suspended,
            flags=before.flags,
            by=by,
        )
        return before

    async def policy(self, tenant: str) -> TenantPolicy:
        """The tenant's policy set at run time (empty: none)."""
        try:
            return await self.policies.get(tenant)
        except AbuseStoreError as exc:
            raise _unavailable(exc) from exc

    async def set_policy(self, tenant: str, policy: TenantPolicy, *, by: str) -> TenantPolicy:
        """Check and store the tenant's policy (InvalidArgumentError when it is wrong)."""
        try:
            checked = await self.policies.set(tenant, policy)
        except AbuseStoreError as exc:
            raise _unavailable(exc) from exc
        _audit.warning(
            "tenant moderation policy set",
            policy_tenant=tenant,
            category_actions=dict(checked.actions),
            keep_text=checked.keep_text,
            by=by,
        )
        return checked

    async def list_events(self, query: ModerationEventQuery) -> Page[ModerationEventRecord]:
        """A page of flag events, newest first."""
        return await self.events.list(query)

    # --- internals -------------------------------------------------------------------

    def _counted(self, standing: Standing, flags: int, category: str) -> Standing:
        """``standing`` with ``flags`` more, as this gateway expects the store to decide."""
        rules = self.rules
        count = standing.flags + flags
        counted = replace(standing, flags=count, throttled=rules.throttled(count))
        if standing.suspended or not rules.suspends(count):
            return counted
        now = self._wall()
        until = now + rules.suspend_s if rules.suspend_s else 0.0
        reason = suspension_reason(count, rules.window_s, category)
        return replace(counted, suspended=True, reason=reason, suspended_at=now, until=until)

    def _put(
        self, account: Account, standing: Standing, *, confirmed: bool, read_at: float | None = None
    ) -> None:
        previous = self._cache.get(account)
        if (
            confirmed
            and standing.suspended
            and not (previous is not None and previous.confirmed and previous.standing.suspended)
        ):
            _audit.warning(
                "account suspended",
                account_tenant=account.tenant,
                account_user=account.user,
                flags=standing.flags,
                reason=standing.reason,
                until=standing.until or None,
            )
        if len(self._cache) >= _CACHE_LIMIT and previous is None:
            self._cache.clear()
            self._epochs.clear()
        self._cache[account] = _Entry(
            standing, self._clock() if read_at is None else read_at, confirmed
        )

    async def _flags_sent(self, account: Account) -> None:
        """Until the store has answered every flag of ``account`` heard so far."""
        while self._unconfirmed.get(account) and self._sender is not None:
            await asyncio.shield(self._sender)

    async def _read(self, account: Account) -> Standing:
        await self._flags_sent(account)
        epoch = self._epochs.get(account, 0)
        try:
            standing = await self.store.standing(account)
        except AbuseStoreError as exc:
            self._store_down(exc)
            entry = self._cache.get(account)
            known = entry.standing if entry is not None else GOOD_STANDING
            # Served on what was known for one more cache period, not a read per call.
            self._put(account, known, confirmed=entry.confirmed if entry else False)
            return known
        if self._epochs.get(account, 0) != epoch:  # a flag or a lift came meanwhile
            entry = self._cache.get(account)
            return entry.standing if entry is not None else standing
        self._put(account, standing, confirmed=True)
        return standing

    def _read_done(self, account: Account, read: asyncio.Future[Standing]) -> None:
        if self._reads.get(account) is read:
            del self._reads[account]
        if not read.cancelled():
            read.exception()  # retrieved: a caller that left must not leave it unseen

    async def _send_flags(self) -> None:
        try:
            await asyncio.sleep(0)  # the flags of this loop iteration go together
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    standings = await self.store.record(batch)
                except AbuseStoreError as exc:
                    _log.warning(
                        "recording flags failed; they are not counted",
                        flags=len(batch),
                        error=str(exc),
                    )
                    continue
                finally:
                    for flag in batch:
                        left = self._unconfirmed.get(flag.account, 1) - 1
                        if left > 0:
                            self._unconfirmed[flag.account] = left
                        else:
                            self._unconfirmed.pop(flag.account, None)
                latest = {flag.account: s for flag, s in zip(batch, standings, strict=True)}
                for account, standing in latest.items():
                    # Flags heard while this batch was out are counted on top.
                    queued = [flag for flag in self._pending if flag.account == account]
                    if queued:
                        standing = self._counted(standing, len(queued), queued[-1].category)
                    self._put(account, standing, confirmed=not queued)
        except Exception:
            _log.exception("recording flags failed")
        finally:
            self._sender = None

    def _store_down(self, exc: AbuseStoreError) -> None:
        if not self.config.fail_open:
            raise _unavailable(exc) from exc
        _log.warning("abuse store unreachable; serving the last known standing", error=str(exc))


def _unavailable(exc: AbuseStoreError) -> UnavailableError:
    message = "account standing cannot be checked right now; retry shortly"
    return UnavailableError(message, retry_after_s=_STORE_RETRY_S)
