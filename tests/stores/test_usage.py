"""The usage half of the store contract, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

from typing import Any

import pytest

from tests.stores.conftest import Backend
from tokenwire.errors import InvalidArgumentError
from tokenwire.stores import UsageRecord, UsageTotal, new_id

T0 = 1_700_000_000.0


def usage(
    tenant: str, user: str, model: str, prompt: int, completion: int, at: float, **fields: Any
) -> UsageRecord:
    """A usage row of a fresh turn."""
    return UsageRecord(
        turn_id=fields.pop("turn_id", new_id("turn")),
        tenant=tenant,
        user=user,
        api_key_id=fields.pop("api_key_id", ""),
        model=model,
        finish_reason=fields.pop("finish_reason", "stop"),
        prompt_tokens=prompt,
        completion_tokens=completion,
        recorded_at=at,
    )


async def record_all(store: Any, *records: UsageRecord) -> None:
    """Record each of ``records``."""
    for record in records:
        await store.record_usage(record)


ROWS = (
    usage("acme", "alice", "small", 10, 5, T0),
    usage("acme", "alice", "big", 100, 50, T0 + 1, finish_reason="cancelled"),
    usage("acme", "bob", "small", 7, 3, T0 + 2, api_key_id="key_1"),
    usage("globex", "alice", "small", 1, 1, T0 + 3),
    usage("globex", "carol", "small", 2, 2, T0 + 10),  # outside [T0, T0 + 10)
    usage("acme", "alice", "small", 4, 4, T0 - 1),  # before the range
)


async def test_totals_group_by_tenant_per_model(store: Any) -> None:
    """Each tenant's turns and tokens in the range, one row per model, sorted."""
    await record_all(store, *ROWS)

    totals = await store.usage_totals(start=T0, end=T0 + 10, group_by="tenant")

    assert [
        UsageTotal("acme", "big", 1, 100, 50),
        UsageTotal("acme", "small", 2, 17, 8),
        UsageTotal("globex", "small", 1, 1, 1),
    ] == totals


async def test_totals_group_by_user_keys_users_by_tenant(store: Any) -> None:
    """Users are keyed tenant/user: acme's alice and globex's alice stay apart."""
    await record_all(store, *ROWS)

    totals = await store.usage_totals(start=T0, end=T0 + 10, group_by="user")

    assert [
        UsageTotal("acme/alice", "big", 1, 100, 50),
        UsageTotal("acme/alice", "small", 1, 10, 5),
        UsageTotal("acme/bob", "small", 1, 7, 3),
        UsageTotal("globex/alice", "small", 1, 1, 1),
    ] == totals


async def test_totals_group_by_model_and_filter_by_tenant(store: Any) -> None:
    """Grouped by model, and limited to one tenant when asked."""
    await record_all(store, *ROWS)

    everyone = await store.usage_totals(start=T0 - 1, end=T0 + 11, group_by="model")
    globex = await store.usage_totals(start=T0, end=T0 + 11, group_by="model", tenant="globex")

    assert [
        UsageTotal("big", "big", 1, 100, 50),
        UsageTotal("small", "small", 5, 24, 15),
    ] == everyone
    assert [UsageTotal("small", "small", 2, 3, 3)] == globex


async def test_a_turn_recorded_twice_counts_once(store: Any) -> None:
    """Recording the same turn id again keeps the first row."""
    first = usage("acme", "alice", "small", 10, 5, T0)
    again = usage("acme", "alice", "small", 99, 99, T0, turn_id=first.turn_id)

    await record_all(store, first, again)

    totals = await store.usage_totals(start=T0, end=T0 + 1, group_by="tenant")
    assert [UsageTotal("acme", "small", 1, 10, 5)] == totals


async def test_rows_keep_every_field(store: Any, backend: Backend) -> None:
    """The row holds the key id and finish reason; an empty range reads nothing."""
    await record_all(store, *ROWS)

    keyed = await backend.count("usage_records", "api_key_id = 'key_1' AND user_name = 'bob'")
    cancelled = await backend.count("usage_records", "finish_reason = 'cancelled'")
    empty = await store.usage_totals(start=T0 + 100, end=T0 + 200, group_by="tenant")
    assert (1, 1, []) == (keyed, cancelled, empty)


async def test_usage_outlives_its_conversation(store: Any) -> None:
    """Deleting a conversation keeps the usage its turns recorded."""
    conversation = await store.create_conversation("acme/alice", title="t")
    await store.record_usage(usage("acme", "alice", "small", 3, 2, T0))

    await store.delete_conversation("acme/alice", conversation.id)

    totals = await store.usage_totals(start=T0, end=T0 + 1, group_by="user")
    assert [UsageTotal("acme/alice", "small", 1, 3, 2)] == totals


@pytest.mark.parametrize(
    ("start", "end", "group_by"),
    [
        (T0, T0, "tenant"),
        (T0 + 1, T0, "tenant"),
        (T0, float("inf"), "tenant"),
        (T0, T0 + 1, "planet"),
    ],
)
async def test_bad_queries_are_invalid_arguments(
    store: Any, start: float, end: float, group_by: str
) -> None:
    """An empty or reversed range, an endless one, or an unknown grouping is refused."""
    with pytest.raises(InvalidArgumentError):
        await store.usage_totals(start=start, end=end, group_by=group_by)


async def test_usage_is_shared_by_the_gateways_of_one_database(
    store: Any, backend: Backend
) -> None:
    """Rows recorded through two stores (gateways) on one database sum together."""
    other = await backend.open_store()

    await store.record_usage(usage("acme", "alice", "small", 1, 2, T0))
    await other.record_usage(usage("acme", "bob", "small", 3, 4, T0))

    totals = await other.usage_totals(start=T0, end=T0 + 1, group_by="tenant")
    assert [UsageTotal("acme", "small", 2, 4, 6)] == totals
