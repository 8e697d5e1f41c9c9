"""Tenant budgets: the store's counters, the periods, and refusals through a real server."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest

from tests.usage.conftest import Keys, complete, refused_complete, usage_server
from tokenwire.auth import SQLiteKeyStore
from tokenwire.errors import ResourceExhaustedError
from tokenwire.quotas import Budget, BudgetStore, MemoryQuotaStore
from tokenwire.stores import SQLiteConversationStore
from tokenwire.testing import FakeBackend
from tokenwire.usage import UsageConfig
from tokenwire.usage.budgets import TenantBudgets, current_period

FAR = 4_102_444_800.0  # 2100-01-01: a period that does not end during a test


def _utc(*parts: int) -> float:
    return dt.datetime(*parts, tzinfo=dt.UTC).timestamp()  # type: ignore[misc]


async def test_a_charge_fits_or_is_refused_whole(budget_store: BudgetStore) -> None:
    """Charges add up to the limit exactly; one that would pass it adds nothing."""
    budget = Budget("{acme}:budget:day:x", 100, FAR)

    first = await budget_store.charge_budget(budget, 60)
    second = await budget_store.charge_budget(budget, 40)
    third = await budget_store.charge_budget(budget, 1)

    assert (60, 100, 100) == (first[0], second[0], third[0])
    assert (True, True, None) == (first[1] is not None, second[1] is not None, third[1])
    assert 100 == await budget_store.budget_used(budget)


async def test_settling_refunds_or_charges_the_difference(budget_store: BudgetStore) -> None:
    """A charge settled lower gives the rest back, settled higher takes more; never below 0."""
    budget = Budget("{acme}:budget:day:y", 100, FAR)
    _, charge = await budget_store.charge_budget(budget, 80)
    assert charge is not None

    budget_store.settle_budget(charge, 30)
    after_refund = await budget_store.budget_used(budget)
    budget_store.settle_budget(charge, 90)  # 30 + (90 - 80)
    after_charge = await budget_store.budget_used(budget)
    budget_store.settle_budget(charge, -1000)
    floor = await budget_store.budget_used(budget)

    assert (30, 40, 0) == (after_refund, after_charge, floor)


async def test_a_period_over_starts_afresh_and_ignores_late_settlements(
    budget_store: BudgetStore,
) -> None:
    """A counter past its expiry is gone; settling a charge of it creates nothing."""
    old = Budget("{acme}:budget:day:old", 100, 1.0)  # expired long ago
    used, charge = await budget_store.charge_budget(old, 50)
    assert charge is not None
    fresh = await budget_store.budget_used(old)
    budget_store.settle_budget(charge, 10)
    after = await budget_store.budget_used(old)

    assert (50, 0, 0) == (used, fresh, after)


async def test_concurrent_charges_never_pass_the_limit(budget_store: BudgetStore) -> None:
    """Fifty charges of 10 at once against 123: exactly twelve are taken."""
    budget = Budget("{acme}:budget:day:z", 123, FAR)

    results = await asyncio.gather(*(budget_store.charge_budget(budget, 10) for _ in range(50)))

    assert 12 == sum(1 for _, charge in results if charge is not None)
    assert 120 == await budget_store.budget_used(budget)


@pytest.mark.parametrize(
    ("period", "now", "name", "end"),
    [
        ("day", _utc(2025, 6, 1, 13, 5), "2025-06-01", _utc(2025, 6, 2)),
        ("day", _utc(2025, 12, 31, 23, 59, 59), "2025-12-31", _utc(2026, 1, 1)),
        ("month", _utc(2025, 6, 30, 23), "2025-06", _utc(2025, 7, 1)),
        ("month", _utc(2025, 12, 1), "2025-12", _utc(2026, 1, 1)),
    ],
)
def test_periods_are_utc_days_and_months(period: str, now: float, name: str, end: float) -> None:
    """The period holding a moment, named and ending at the next UTC midnight or month."""
    assert (name, end) == current_period(period, now)


async def test_a_refusal_waits_for_the_period_to_end_and_names_the_budget() -> None:
    """RESOURCE_EXHAUSTED with the exact delay to the end of the month and a QuotaFailure
    for tenant:acme / tokens_per_month; a turn larger than the budget gets no delay."""
    now = _utc(2099, 6, 30, 23, 0, 0)  # the store expires counters by the wall clock
    config = UsageConfig(tenant_budgets={"acme": 100}, budget_period="month")  # type: ignore[arg-type]
    budgets = TenantBudgets(config, MemoryQuotaStore(), clock=lambda: now)
    await budgets.charge("acme", 90)
    assert await budgets.charge("globex", 10**9) is None  # no budget, no limit

    with pytest.raises(ResourceExhaustedError) as over:
        await budgets.charge("acme", 11)
    with pytest.raises(ResourceExhaustedError) as never:
        await budgets.charge("acme", 101)

    violation = over.value.details[0].violations[0]  # type: ignore[attr-defined]
    assert 3600.0 == over.value.retry_after_s
    assert ("tenant:acme", "tokens_per_month", 100) == (
        violation.subject, violation.description, violation.quota_value,
    )  # fmt: skip
    assert None is never.value.retry_after_s
    assert "lower max_tokens" in never.value.message


async def test_the_turn_that_would_exceed_the_budget_is_refused(
    key_store: SQLiteKeyStore, keys: Keys
) -> None:
    """With room for exactly two turns (settled to their real use), the third is refused
    with the delay until midnight UTC and the budget named; a smaller one still fits;
    another tenant is not affected."""
    store = SQLiteConversationStore(":memory:")
    async with usage_server(key_store, store) as probe:
        prompt = (await complete(probe.running, keys.alice, "Hello", max_tokens=50)).prompt_tokens
    used = prompt + 3  # the reply "Hi!" is three tokens
    config = UsageConfig(tenant_budgets={"acme": 2 * used + prompt + 50 - 1})  # type: ignore[arg-type]
    async with usage_server(
        key_store, SQLiteConversationStore(":memory:"), usage=config,
        backend=FakeBackend(reply="Hi!"),
    ) as server:  # fmt: skip
        first = await complete(server.running, keys.alice, "Hello", max_tokens=50)
        second = await complete(server.running, keys.bob, "Hello", max_tokens=50)
        refusal = await refused_complete(server.running, keys.alice, "Hello", max_tokens=50)
        smaller = await complete(server.running, keys.alice, "Hello", max_tokens=49)
        other = await complete(server.running, keys.carol, "Hello", max_tokens=50)
    _, midnight = current_period("day", dt.datetime.now(dt.UTC).timestamp())
    assert [used, used] == [u.prompt_tokens + u.completion_tokens for u in (first, second)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED == refusal.code
    assert refusal.retry_after_s is not None
    left = midnight - dt.datetime.now(dt.UTC).timestamp()
    assert left - 5 < refusal.retry_after_s <= left + 5
    assert refusal.quota_failure is not None
    assert [("tenant:acme", "tokens_per_day")] == [
        (v.subject, v.description) for v in refusal.quota_failure.violations
    ]
    assert (3, 3) == (smaller.completion_tokens, other.completion_tokens)
