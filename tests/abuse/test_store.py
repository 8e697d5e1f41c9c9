"""The abuse store contract, run against the in-memory store and the Redis store alike."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as aioredis

from tests.abuse.conftest import REDIS_URL, RULES, store_of
from tests.conftest import require_redis
from tokenwire.abuse import (
    GOOD_STANDING,
    AbuseRules,
    AbuseStore,
    Account,
    Flag,
    MemoryAbuseStore,
    Standing,
    TenantPolicy,
)
from tokenwire.abuse import redis_scripts as scripts
from tokenwire.abuse.redis import RedisAbuseStore

ALICE = Account("acme", "alice")
BOB = Account("acme", "bob")
REASON = "5 flagged messages within 3600s (latest: violence)"


def flags(account: Account, count: int, category: str = "violence") -> list[Flag]:
    """``count`` flags of ``account`` in ``category``."""
    return [Flag(account, category)] * count


async def test_flags_add_up_to_a_throttle_then_a_suspension(abuse_store: AbuseStore) -> None:
    """Each flag's standing counts it; at 3 the account is throttled, at 5 suspended with
    the reason, until lifted."""
    standings = await abuse_store.record(flags(ALICE, 5))
    assert [1, 2, 3, 4, 5] == [s.flags for s in standings]
    assert [False, False, True, True, True] == [s.throttled for s in standings]
    assert [False, False, False, False, True] == [s.suspended for s in standings]
    suspended = standings[-1]
    assert (REASON, 0.0) == (suspended.reason, suspended.until)
    assert suspended.suspended_at > 0
    assert suspended == await abuse_store.standing(ALICE)


async def test_accounts_count_apart(abuse_store: AbuseStore) -> None:
    """Flags of one user count against nobody else, in the tenant or out of it."""
    await abuse_store.record(flags(ALICE, 4))
    assert GOOD_STANDING == await abuse_store.standing(BOB)
    assert GOOD_STANDING == await abuse_store.standing(Account("globex", "alice"))


async def test_a_later_flag_keeps_the_first_suspension(abuse_store: AbuseStore) -> None:
    """A flag heard while suspended counts, and the suspension keeps its reason and time."""
    first = (await abuse_store.record(flags(ALICE, 5)))[-1]
    later = (await abuse_store.record(flags(ALICE, 1, "hate")))[0]
    assert (6, first.reason, first.suspended_at) == (later.flags, later.reason, later.suspended_at)


async def test_flags_older_than_the_window_no_longer_count() -> None:
    """A flag stops counting once the window has passed over it, and so does the throttle."""
    for kind in ("memory", "redis"):
        async with store_of(kind, AbuseRules(window_s=0.3, throttle_after=3)) as store:
            await store.record(flags(ALICE, 3))
            throttled = await store.standing(ALICE)
            await asyncio.sleep(0.4)
            assert (3, True) == (throttled.flags, throttled.throttled), kind
            assert GOOD_STANDING == await store.standing(ALICE), kind


async def test_a_throttled_account_gets_its_turns_then_a_true_delay() -> None:
    """Throttled at 2 turns per 0.6 s: two pass, the third waits the advertised delay and
    then passes."""
    rules = AbuseRules(throttle_after=3, throttle_turns=2, throttle_window_s=0.6)
    for kind in ("memory", "redis"):
        async with store_of(kind, rules) as store:
            await store.record(flags(ALICE, 3))
            delays = [(await store.admit_turn(ALICE))[1] for _ in range(3)]
            assert [0.0, 0.0] == delays[:2], kind
            assert 0.1 < delays[2] <= 0.301, kind
            await asyncio.sleep(delays[2])
            assert 0.0 == (await store.admit_turn(ALICE))[1], kind


async def test_an_account_in_good_standing_takes_nothing_from_the_bucket(
    abuse_store: AbuseStore,
) -> None:
    """Turns before the throttle are not counted: once throttled, the whole burst is there."""
    for _ in range(5):
        assert (GOOD_STANDING, 0.0) == await abuse_store.admit_turn(ALICE)
    await abuse_store.record(flags(ALICE, 3))
    delays = [(await abuse_store.admit_turn(ALICE))[1] for _ in range(3)]
    assert [0.0, 0.0] == delays[:2]
    assert delays[2] > 0


async def test_a_suspended_accounts_turn_reports_the_suspension(abuse_store: AbuseStore) -> None:
    """admit_turn of a suspended account says so, and takes nothing from the bucket."""
    await abuse_store.record(flags(ALICE, 5))
    standing, delay = await abuse_store.admit_turn(ALICE)
    assert (True, 0.0) == (standing.suspended, delay)


async def test_lifting_ends_the_suspension_and_forgets_the_flags(abuse_store: AbuseStore) -> None:
    """Lift answers the standing before and leaves the account in good standing."""
    await abuse_store.record(flags(ALICE, 5))
    before = await abuse_store.lift(ALICE)
    assert (True, 5, REASON) == (before.suspended, before.flags, before.reason)
    assert GOOD_STANDING == await abuse_store.standing(ALICE)
    assert GOOD_STANDING == await abuse_store.lift(ALICE)  # nothing left to lift


async def test_a_timed_suspension_ends_by_itself() -> None:
    """With suspend_s the suspension carries its end, and is over after it."""
    rules = AbuseRules(throttle_after=0, suspend_after=2, suspend_s=0.3)
    for kind in ("memory", "redis"):
        async with store_of(kind, rules) as store:
            suspended = (await store.record(flags(ALICE, 2)))[-1]
            await asyncio.sleep(0.4)
            after = await store.standing(ALICE)
            assert suspended.suspended, kind
            assert 0.29 < suspended.until - suspended.suspended_at <= 0.31, kind
            assert Standing(2) == after, kind


async def test_zero_thresholds_never_throttle_or_suspend() -> None:
    """throttle_after = suspend_after = 0: flags are counted, nothing follows."""
    rules = AbuseRules(throttle_after=0, suspend_after=0)
    for kind in ("memory", "redis"):
        async with store_of(kind, rules) as store:
            standing = (await store.record(flags(ALICE, 12)))[-1]
            assert Standing(12) == standing, kind


async def test_tenant_policies_are_versioned(abuse_store: AbuseStore) -> None:
    """Each change moves the version; a reader that knows the version gets nothing new,
    one that does not gets every policy; an empty policy removes the tenant's."""
    start, everything = await abuse_store.policies(-1)
    acme = TenantPolicy({"violence": "allow"}, keep_text=True)
    first = await abuse_store.set_policy("acme", acme)
    await abuse_store.set_policy("globex", TenantPolicy({}, keep_text=False))
    version, policies = await abuse_store.policies(start)
    same, nothing = await abuse_store.policies(version)
    removed = await abuse_store.set_policy("globex", TenantPolicy())
    _, left = await abuse_store.policies(version)
    assert {} == everything
    assert (start + 1, start + 2, start + 3) == (first, version, removed)
    assert {"acme": acme, "globex": TenantPolicy({}, False)} == policies
    assert (version, None) == (same, nothing)
    assert {"acme": acme} == left


def test_the_memory_store_window_slides_with_its_clock() -> None:
    """In memory, on a fake clock: flags leave the window exactly window_s after they came,
    and at most count_cap of them are kept."""
    now = [1000.0]
    store = MemoryAbuseStore(AbuseRules(window_s=10.0), clock=lambda: now[0])

    async def run() -> list[int]:
        seen = [(await store.record(flags(ALICE, 1)))[0].flags]
        now[0] += 6
        seen.append((await store.record(flags(ALICE, 1)))[0].flags)
        now[0] += 4  # the first flag is exactly window_s old
        seen.append((await store.standing(ALICE)).flags)
        seen.append((await store.record(flags(ALICE, 150)))[-1].flags)
        return seen

    assert [1, 2, 1, 100] == asyncio.run(run())


class _Counting:
    """Counts the round trips a Redis client makes: pipelines sent and single commands."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.round_trips = 0
        original_pipeline, original_command = client.pipeline, client.execute_command

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = original_pipeline(*args, **kwargs)
            execute = pipe.execute

            async def counted(*a: Any, **k: Any) -> Any:
                self.round_trips += 1
                return await execute(*a, **k)

            pipe.execute = counted  # type: ignore[method-assign]
            return pipe

        async def command(*args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            return await original_command(*args, **kwargs)

        client.pipeline = pipeline  # type: ignore[method-assign]
        client.execute_command = command  # type: ignore[method-assign]


async def test_redis_records_a_batch_and_reads_a_standing_in_one_round_trip_each(
    redis_prefix: str,
) -> None:
    """One round trip for one flag, one for a batch of three, one per standing read, one
    per throttled turn; a second gateway's store sees the same counts."""
    require_redis()
    client = aioredis.Redis.from_url(REDIS_URL)
    counting = _Counting(client)
    store = RedisAbuseStore(REDIS_URL, RULES, key_prefix=redis_prefix, client=client)
    other = RedisAbuseStore(REDIS_URL, RULES, key_prefix=redis_prefix)
    try:
        trips = [counting.round_trips]
        await store.record(flags(ALICE, 1))
        trips.append(counting.round_trips)
        await store.record(flags(ALICE, 2) + flags(BOB, 1))
        trips.append(counting.round_trips)
        standing = await store.standing(ALICE)
        trips.append(counting.round_trips)
        await store.admit_turn(ALICE)
        trips.append(counting.round_trips)
        seen_elsewhere = await other.standing(ALICE)
    finally:
        await other.close()
        await client.aclose()
    assert [0, 1, 2, 3, 4] == trips
    assert (3, True) == (standing.flags, standing.throttled)
    assert standing == seen_elsewhere


async def test_redis_loads_a_script_that_redis_does_not_know(redis_prefix: str) -> None:
    """A script Redis has not seen (it restarted, or flushed its scripts) is loaded and run."""
    store = RedisAbuseStore(REDIS_URL, RULES, key_prefix=redis_prefix)
    # A text of its own, so its SHA is unknown to Redis (no SCRIPT FLUSH on a shared server).
    unknown = f"{scripts.RECORD}\n-- {uuid.uuid4().hex}"
    store._record = store._client.register_script(unknown)
    try:
        standing = (await store.record(flags(ALICE, 1)))[0]
    finally:
        await store.close()
    assert 1 == standing.flags
