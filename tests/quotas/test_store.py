"""The quota store contract, run against the in-memory store and the Redis store alike."""

from __future__ import annotations

import asyncio
import math

from tests.quotas.conftest import REDIS_URL
from tokenwire.quotas import QuotaStore, Rate, Slot
from tokenwire.quotas.redis import RedisQuotaStore
from tokenwire.quotas.store import tenant_tag

HOUR = 3600.0  # long enough that nothing drains measurably during a test


async def test_consume_admits_the_limit_then_refuses_with_a_true_delay(store: QuotaStore) -> None:
    """A burst of `limit` passes; the next waits the advertised delay and then passes."""
    rate = Rate("u:alice:rpm", limit=3, window_s=0.6)  # one unit refills every 0.2 s
    verdicts = [await store.consume([rate], 1) for _ in range(4)]
    assert [True, True, True, False] == [v.allowed for v in verdicts]
    refused = verdicts[-1]
    assert (0,) == refused.violated
    assert 0.1 < refused.retry_after_s <= 0.201
    await asyncio.sleep(refused.retry_after_s)
    assert (await store.consume([rate], 1)).allowed


async def test_several_rates_are_taken_all_or_none(store: QuotaStore) -> None:
    """When the tenant's rate refuses, the principal's rate is not charged either."""
    mine = Rate("u:bob:rpm", limit=10, window_s=HOUR)
    tenant = Rate("t:rpm", limit=1, window_s=HOUR)
    assert (await store.consume([mine, tenant], 1)).allowed
    refused = await store.consume([mine, tenant], 1)
    assert (False, (1,)) == (refused.allowed, refused.violated)
    assert 1 == round(await store.used(mine))
    assert 1 == round(await store.used(tenant))


async def test_the_delay_is_that_of_the_slowest_refusing_rate(store: QuotaStore) -> None:
    """Refused by two rates, the caller is told to wait for the later one."""
    fast = Rate("fast", limit=1, window_s=0.1)
    slow = Rate("slow", limit=1, window_s=HOUR)
    assert (await store.consume([fast, slow], 1)).allowed
    refused = await store.consume([fast, slow], 1)
    assert (0, 1) == refused.violated
    assert HOUR - 1 < refused.retry_after_s <= HOUR


async def test_a_cost_above_the_limit_never_fits(store: QuotaStore) -> None:
    """A cost above the whole bucket is refused with an infinite delay, and charges nothing."""
    rate = Rate("tpm", limit=100, window_s=HOUR)
    verdict = await store.consume([rate], 101)
    assert (False, math.inf) == (verdict.allowed, verdict.retry_after_s)
    assert 0 == round(await store.used(rate))


async def test_settle_refunds_what_a_reservation_did_not_use(store: QuotaStore) -> None:
    """Reserve 80 of 100, settle to 30: 30 stay counted and 70 fit again."""
    rate = Rate("tpm", limit=100, window_s=HOUR)
    verdict, reservation = await store.reserve([rate], 80)
    assert verdict.allowed
    assert reservation is not None
    assert not (await store.consume([rate], 70)).allowed
    await store.settle(reservation, 30)
    assert 30 == round(await store.used(rate))
    assert (await store.consume([rate], 70)).allowed


async def test_settle_charges_what_a_turn_used_beyond_its_reservation(store: QuotaStore) -> None:
    """Settling above the reservation charges the difference too."""
    rate = Rate("tpm", limit=100, window_s=HOUR)
    _, reservation = await store.reserve([rate], 10)
    assert reservation is not None
    await store.settle(reservation, 25)
    assert 25 == round(await store.used(rate))


async def test_a_late_settle_refunds_only_what_is_still_in_the_bucket(store: QuotaStore) -> None:
    """A reservation that has drained already is not refunded again: no capacity is minted."""
    rate = Rate("tpm", limit=100, window_s=0.2)
    _, reservation = await store.reserve([rate], 100)
    assert reservation is not None
    await asyncio.sleep(0.25)  # the whole reservation drained meanwhile
    assert (await store.consume([rate], 100)).allowed
    await store.settle(reservation, 0)
    assert not (await store.consume([rate], 50)).allowed


async def test_slots_are_taken_all_or_none_and_released_once(store: QuotaStore) -> None:
    """Leases fill a slot key up to its limit; release frees them; releasing twice is harmless."""
    mine, tenant = Slot("u:carol:streams", 2), Slot("t:streams", 1)
    verdict, first = await store.acquire([mine, tenant])
    assert verdict.allowed
    assert first is not None
    refused, nothing = await store.acquire([mine, tenant])
    assert (False, (1,), None) == (refused.allowed, refused.violated, nothing)
    assert 1 == await store.in_use(mine)
    await store.release(first)
    await store.release(first)
    assert (0, 0) == (await store.in_use(mine), await store.in_use(tenant))
    assert (await store.acquire([mine, tenant]))[0].allowed


async def test_redis_leases_outlive_their_ttl_while_renewed(redis_prefix: str) -> None:
    """A live gateway keeps renewing its leases: a slot held for twice the TTL stays held."""
    slot = Slot("t:streams", 5)
    live = RedisQuotaStore(REDIS_URL, key_prefix=redis_prefix, lease_ttl_s=0.3)
    await live.start()
    try:
        _, lease = await live.acquire([slot])
        assert lease is not None
        await asyncio.sleep(0.7)
        assert 1 == await live.in_use(slot)
        await live.release(lease)
        assert 0 == await live.in_use(slot)
    finally:
        await live.close()


async def test_renewal_never_resurrects_a_released_lease(redis_prefix: str) -> None:
    """Renewing after a release leaves the slot free (renewal only extends live members)."""
    slot = Slot("t:streams", 1)
    store = RedisQuotaStore(REDIS_URL, key_prefix=redis_prefix, lease_ttl_s=30)
    await store.start()
    try:
        _, lease = await store.acquire([slot])
        assert lease is not None
        await store.release(lease)
        store._live[lease.lease_id] = lease  # as a renewal that read its leases before
        await store.renew()
        assert 0 == await store.in_use(slot)
    finally:
        store._live.clear()
        await store.close()


async def test_admit_takes_slot_request_and_tokens_or_refuses_at_one_stage(
    store: QuotaStore,
) -> None:
    """A turn's admission: all three, or refused at streams or requests (nothing taken),
    or at tokens (the request still counts)."""
    slot = Slot("u:carol:streams", 1)
    requests = Rate("u:carol:rpm", limit=3, window_s=HOUR)
    tokens = Rate("u:carol:tpm", limit=100, window_s=HOUR)
    first = await store.admit([slot], [requests], [tokens], 60)
    assert ("", 1, 1, 60) == (
        first.refused,
        await store.in_use(slot),
        round(await store.used(requests)),
        round(await store.used(tokens)),
    )
    busy = await store.admit([slot], [requests], [tokens], 10)
    assert ("streams", (0,)) == (busy.refused, busy.verdict.violated)
    assert (1, 60) == (round(await store.used(requests)), round(await store.used(tokens)))
    no_room = await store.admit([], [requests], [tokens], 50)
    assert "tokens" == no_room.refused
    assert 0 < no_room.verdict.retry_after_s
    assert (2, 60) == (round(await store.used(requests)), round(await store.used(tokens)))
    assert first.lease is not None
    store.finish(first.lease, first.reservation, 25)  # refunds 35, frees the slot
    assert (0, 25) == (await store.in_use(slot), round(await store.used(tokens)))
    await store.admit([], [requests], [], 0)
    over = await store.admit([slot], [requests], [tokens], 1)
    assert ("requests", 0, 25) == (
        over.refused,
        await store.in_use(slot),
        round(await store.used(tokens)),
    )


async def test_redis_admission_carries_the_last_turns_settlement_in_one_round_trip(
    redis_prefix: str,
) -> None:
    """Redis: finish() waits for nothing; the next admit sends it along, in one round trip."""
    store = RedisQuotaStore(REDIS_URL, key_prefix=redis_prefix)
    await store.start()
    sent: list[int] = []
    original = store._send

    async def counting(ops: list[object]) -> list[object]:
        batch = len(store._pending) + len(ops)
        sent.append(batch)
        return await original(ops)  # type: ignore[arg-type]

    store._send = counting  # type: ignore[method-assign]
    try:
        slot = Slot("u:dan:streams", 1)
        tokens = Rate("u:dan:tpm", limit=1000, window_s=HOUR)
        first = await store.admit([slot], [], [tokens], 300)
        store.finish(first.lease, first.reservation, 120)
        second = await store.admit([slot], [], [tokens], 300)  # the slot is free again
        assert ("", "") == (first.refused, second.refused)
        assert [1, 3] == sent  # admit; then settle + release + admit, one pipeline
        store.finish(second.lease, second.reservation, 100)
        await asyncio.sleep(0.05)  # no call came along: the flush sent them on its own
        assert [1, 3, 2] == sent
        assert 220 == round(await store.used(tokens))
    finally:
        await store.close()


def test_tenant_tag_is_one_hash_tag_per_tenant() -> None:
    # Redis Cluster hashes the text between the first "{" and the next "}": a tenant
    # name holding braces must neither end the tag early nor meet another tenant's tag.
    names = ["acme", "a{b}", "a%7Bb}", "}", "{", "%", "%25", ""]
    tags = [tenant_tag(name) for name in names]
    assert len(set(tags)) == len(names)
    for tag in tags:
        assert tag.startswith("{")
        assert tag.endswith("}")
        assert "{" not in tag[1:-1]
        assert "}" not in tag[1:-1]
    assert tenant_tag("acme") == "{acme}"
