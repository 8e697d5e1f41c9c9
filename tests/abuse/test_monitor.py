"""The abuse monitor on plain types: flags counted at once, standings cached, events kept."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from tests.abuse.conftest import RULES, abuse_config
from tokenwire.abuse import (
    AbuseStoreError,
    Account,
    AccountSuspendedError,
    AccountThrottledError,
    Flag,
    MemoryAbuseStore,
    Standing,
    TenantPolicy,
)
from tokenwire.abuse.monitor import AbuseMonitor
from tokenwire.auth.principal import Principal
from tokenwire.errors import InvalidArgumentError, UnavailableError
from tokenwire.moderation.actions import FlagEvent, FlagSink, TenantOverrides
from tokenwire.stores import SQLiteConversationStore
from tokenwire.stores.moderation_events import ModerationEventQuery

ALICE = Principal("acme", "alice")


class CountingStore(MemoryAbuseStore):
    """The memory store, counting the calls made to it; ``down`` makes every call fail."""

    def __init__(self) -> None:
        super().__init__(RULES)
        self.calls: Counter[str] = Counter()
        self.down = False

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.down:
            raise AbuseStoreError("the store is down")

    async def record(self, flags: Sequence[Flag]) -> list[Standing]:
        self._call("record")
        return await super().record(flags)

    async def standing(self, account: Account) -> Standing:
        self._call("standing")
        return await super().standing(account)

    async def admit_turn(self, account: Account) -> tuple[Standing, float]:
        self._call("admit_turn")
        return await super().admit_turn(account)


class Clock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def flag(action: str = "block", principal: Principal = ALICE, text: str = "") -> FlagEvent:
    """A flagged input of ``principal`` in category violence."""
    keep = bool(text)
    return FlagEvent(principal, "turn_1", "input", "violence", "rules", 1.0, action, text, keep)


async def monitor_of(store: Any, clock: Clock | None = None, **fields: Any) -> AbuseMonitor:
    """A started monitor over ``store`` with events in a throwaway SQLite store."""
    events = SQLiteConversationStore(":memory:")
    await events.open()
    extra = {"clock": clock} if clock is not None else {}
    monitor = AbuseMonitor(abuse_config(**fields), store, events=events, **extra)
    await monitor.start()
    return monitor


async def test_the_monitor_is_moderations_flag_sink_and_tenant_overrides() -> None:
    """What ModerationPolicy takes as flags= and overrides=."""
    monitor = await monitor_of(CountingStore())
    assert isinstance(monitor, FlagSink)
    assert isinstance(monitor, TenantOverrides)
    await monitor.close()


async def test_a_flag_counts_in_the_cached_standing_at_once() -> None:
    """Right after flagged() returns, before the store has answered, the cached standing
    counts it; the store then records the flags of one loop iteration in one call."""
    store = CountingStore()
    monitor = await monitor_of(store)
    await monitor.check(ALICE)  # read once: this gateway knows alice
    for _ in range(RULES.suspend_after):
        monitor.flagged(flag())
    local = monitor.cached(ALICE)
    await asyncio.sleep(0.01)
    recorded = await store.standing(Account("acme", "alice"))
    await monitor.close()
    assert local is not None
    assert (5, True, True) == (local.flags, local.throttled, local.suspended)
    assert 1 == store.calls["record"]
    assert (5, True) == (recorded.flags, recorded.suspended)


async def test_an_account_flagged_before_it_was_read_is_read_after_its_flags() -> None:
    """Flags of an account this gateway has not read are sent before it is read, so the
    next check already sees the suspension they caused."""
    store = CountingStore()
    await store.record([Flag(Account("acme", "alice"), "violence")] * 4)
    monitor = await monitor_of(store)
    monitor.flagged(flag())
    with pytest.raises(AccountSuspendedError):
        await monitor.check(ALICE)
    await monitor.close()


async def test_allowed_flags_are_kept_but_not_counted() -> None:
    """An allow flag is listed with the others and counts against nobody."""
    store = CountingStore()
    monitor = await monitor_of(store)
    monitor.flagged(flag("allow"))
    monitor.flagged(flag("log"))
    monitor.flagged(flag("block"))
    page = await monitor.list_events(ModerationEventQuery())
    standing = await monitor.account_standing("acme", "alice")
    await monitor.close()
    assert Counter(["allow", "log", "block"]) == Counter(e.action for e in page.items)
    assert 2 == standing.flags


async def test_events_keep_text_only_where_the_tenant_keeps_it() -> None:
    """The listed event carries the flagged text only when its flag says keep_text."""
    monitor = await monitor_of(CountingStore())
    monitor.flagged(flag(text="kept words"))
    monitor.flagged(flag(principal=Principal("globex", "carol")))
    page = await monitor.list_events(ModerationEventQuery())
    await monitor.close()
    assert {("acme", "kept words"), ("globex", "")} == {(e.tenant, e.text) for e in page.items}


async def test_standings_are_read_once_per_cache_period() -> None:
    """While the cached standing is fresh no call reaches the store; concurrent reads of a
    stale one share one read."""
    store, clock = CountingStore(), Clock()
    monitor = await monitor_of(store, clock, standing_cache_s=1.0)
    await asyncio.gather(*(monitor.check(ALICE) for _ in range(10)))
    reads = [store.calls["standing"]]
    clock.now += 0.9
    await monitor.check(ALICE)
    reads.append(store.calls["standing"])
    clock.now += 0.2
    await asyncio.gather(*(monitor.check(ALICE) for _ in range(10)))
    reads.append(store.calls["standing"])
    await monitor.close()
    assert [1, 1, 2] == reads


async def test_a_suspended_principal_is_refused_with_the_reason() -> None:
    """check() raises AccountSuspendedError: PERMISSION_DENIED naming the reason."""
    monitor = await monitor_of(CountingStore())
    for _ in range(RULES.suspend_after):
        monitor.flagged(flag())
    with pytest.raises(AccountSuspendedError) as refused:
        await monitor.check(ALICE)
    await monitor.close()
    assert (
        "suspended for repeated policy violations: 5 flagged messages within 3600s "
        "(latest: violence); until it is lifted; contact your administrator"
    ) == refused.value.message


async def test_a_throttled_principal_gets_its_turns_then_a_retry_delay() -> None:
    """Throttled: two turns pass, the third is RESOURCE_EXHAUSTED with a delay; a principal
    in good standing costs no store call per turn."""
    store = CountingStore()
    monitor = await monitor_of(store)
    for _ in range(5):
        await monitor.admit_turn(Principal("acme", "bob"))
    for _ in range(RULES.throttle_after):
        monitor.flagged(flag())
    await monitor.admit_turn(ALICE)
    await monitor.admit_turn(ALICE)
    with pytest.raises(AccountThrottledError) as refused:
        await monitor.admit_turn(ALICE)
    await monitor.close()
    assert 3 == store.calls["admit_turn"]
    assert refused.value.retry_after_s is not None
    assert 29 < refused.value.retry_after_s <= 30


async def test_lifting_restores_service_here_at_once() -> None:
    """After lift() the cached standing is good: the next call passes without a read."""
    store = CountingStore()
    monitor = await monitor_of(store)
    for _ in range(RULES.suspend_after):
        monitor.flagged(flag())
    await asyncio.sleep(0.01)
    before = await monitor.lift("acme", "alice", by="ops/root")
    standing = await monitor.check(ALICE)
    await monitor.close()
    assert (True, Standing()) == (before.suspended, standing)


async def test_an_unreachable_store_serves_the_last_known_standing_when_open() -> None:
    """fail_open: a read that fails answers what was known; without it, UNAVAILABLE."""
    store, clock = CountingStore(), Clock()
    monitor = await monitor_of(store, clock, standing_cache_s=1.0)
    for _ in range(RULES.throttle_after):
        monitor.flagged(flag())
    await asyncio.sleep(0.01)
    store.down = True
    clock.now += 5
    known = await monitor.standing(ALICE)
    await monitor.close()
    strict = await monitor_of(store, clock, fail_open=False)
    with pytest.raises(UnavailableError):
        await strict.check(ALICE)
    await strict.close()
    assert (3, True) == (known.flags, known.throttled)


async def test_tenant_policies_apply_at_once_and_are_checked() -> None:
    """A set policy answers tenant_actions and keeps_text at once; a bad action is
    INVALID_ARGUMENT and changes nothing."""
    monitor = await monitor_of(CountingStore())
    await monitor.set_policy("acme", TenantPolicy({"violence": "Allow"}, True), by="ops/root")
    with pytest.raises(InvalidArgumentError):
        await monitor.set_policy("acme", TenantPolicy({"violence": "ignore"}), by="ops/root")
    answers = (monitor.tenant_actions("acme"), monitor.keeps_text("acme"))
    others = (monitor.tenant_actions("globex"), monitor.keeps_text("globex"))
    stored = await monitor.policy("acme")
    await monitor.close()
    assert ({"violence": "allow"}, True) == (dict(answers[0] or {}), answers[1])
    assert (None, None) == others
    assert ({"violence": "allow"}, True) == (dict(stored.actions), stored.keep_text)
