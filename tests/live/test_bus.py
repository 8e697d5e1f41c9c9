"""The live bus contract, run against the in-memory bus and the Redis bus alike."""

from __future__ import annotations

import asyncio
import inspect

from tests.conftest import REDIS_URL
from tests.live.conftest import MakeBus, delta, nothing_more, take
from tokenwire.live import Lagged, LiveBus, LiveEvent, MemoryLiveBus
from tokenwire.live.redis_bus import RedisLiveBus

BUFFER = 256  # events buffered per conversation in these tests


async def test_events_arrive_in_order_to_two_followers(make_bus: MakeBus) -> None:
    """Two followers each get every event, in publish order."""
    bus = await make_bus()
    first, second = bus.follow("c-1"), bus.follow("c-1")
    for index in range(50):
        bus.publish("c-1", delta(index))
    expected = [delta(index) for index in range(50)]
    assert expected == await take(first, 50)
    assert expected == await take(second, 50)


async def test_from_start_replays_buffered_events_then_live_ones(make_bus: MakeBus) -> None:
    """A follower from the start gets what was published before it, then what comes after."""
    bus = await make_bus()
    started = LiveEvent("started", "t-1", answer_id="m-2", model="tiny", created_at=12.5)
    bus.publish("c-1", started)
    bus.publish("c-1", delta(0))
    await bus.flush()
    follower = bus.follow("c-1", from_start=True)
    assert [started, delta(0)] == await take(follower, 2)
    bus.publish("c-1", delta(1))
    assert [delta(1)] == await take(follower, 1)


async def test_follow_sees_only_events_published_after_the_call(make_bus: MakeBus) -> None:
    """Without from_start, events published before follow() are not replayed."""
    bus = await make_bus()
    bus.publish("c-1", delta(0))
    follower = bus.follow("c-1")
    bus.publish("c-1", delta(1))
    bus.publish("c-1", delta(2))
    assert [delta(1), delta(2)] == await take(follower, 2)


async def test_a_follower_that_reads_nothing_lags_once_then_gets_newer_events(
    make_bus: MakeBus,
) -> None:
    """Three buffers' worth unread: one Lagged, then the newest events in order, no second one."""
    bus = await make_bus(buffer_events=BUFFER)
    follower = bus.follow("c-1")
    total = 3 * BUFFER
    for index in range(total):
        assert bus.publish("c-1", delta(index)) is None
    await bus.flush()
    lagged = await take(follower, 1)
    assert [Lagged] == [type(item) for item in lagged]
    items: list[LiveEvent | Lagged] = []
    while not items or items[-1] != delta(total - 1):
        items += await take(follower, 1)
    indices = [int(item.text) for item in items if isinstance(item, LiveEvent)]
    assert len(items) == len(indices)  # no second Lagged
    assert list(range(indices[0], total)) == indices
    assert 0 < indices[0] <= total - BUFFER
    bus.publish("c-1", delta(total))
    assert [delta(total)] == await take(follower, 1)


async def test_publish_is_a_plain_function(make_bus: MakeBus) -> None:
    """publish() is synchronous: the turn calls it without awaiting anything."""
    bus = await make_bus()
    assert not inspect.iscoroutinefunction(bus.publish)
    assert bus.publish("c-1", delta(0)) is None


async def test_close_ends_the_followers_iterators(make_bus: MakeBus) -> None:
    """A follower waiting for events ends when the bus closes; one started after ends at once."""
    bus = await make_bus()
    follower = bus.follow("c-1")
    bus.publish("c-1", delta(0))
    assert [delta(0)] == await take(follower, 1)

    async def rest() -> list[LiveEvent | Lagged]:
        return [item async for item in follower]

    waiting = asyncio.create_task(rest())
    await asyncio.sleep(0.05)
    await bus.close()
    assert [] == await asyncio.wait_for(waiting, 5.0)
    assert [] == [item async for item in bus.follow("c-1", from_start=True)]


async def test_events_of_two_conversations_do_not_mix(make_bus: MakeBus) -> None:
    """Each follower gets its own conversation's events only."""
    bus = await make_bus()
    mine, theirs = bus.follow("c-1"), bus.follow("c-2")
    for index in range(10):
        bus.publish("c-1", delta(index, "t-1"))
        bus.publish("c-2", delta(index, "t-2"))
    assert [delta(index, "t-1") for index in range(10)] == await take(mine, 10)
    assert [delta(index, "t-2") for index in range(10)] == await take(theirs, 10)
    await bus.flush()
    assert await nothing_more(mine)


async def test_unicode_text_round_trips_exactly(make_bus: MakeBus) -> None:
    """Every field survives the bus unchanged, whatever the characters."""
    bus = await make_bus()
    weird = 'héllo 世界 🙂 e\u0301 \u2028\u2029 \x00 \\n "q" \ud800'
    events = [
        LiveEvent(
            "started",
            "t-✓",
            answer_id="m-é",
            model="модель",
            user_message_id="u-1",
            user_text=weird,
            created_at=1722222222.123456,
        ),
        LiveEvent("delta", "t-✓", text=weird, token_count=7),
        LiveEvent(
            "finished",
            "t-✓",
            finish_reason="stop",
            filter_category="ヘイト",
            prompt_tokens=11,
            completion_tokens=7,
            ttft_ms=0.1 + 0.2,
        ),
    ]
    follower = bus.follow("c-ü 1")
    for event in events:
        bus.publish("c-ü 1", event)
    assert events == await take(follower, 3)


async def test_a_follower_on_a_second_gateway_sees_the_first_ones_events(
    redis_prefix: str,
) -> None:
    """Two RedisLiveBus objects on one Redis: one publishes, the other follows (and replays)."""
    publisher = RedisLiveBus(REDIS_URL, key_prefix=redis_prefix)
    watcher = RedisLiveBus(REDIS_URL, key_prefix=redis_prefix)
    await publisher.open()
    await watcher.open()
    try:
        live = watcher.follow("c-1")
        await watcher.flush()  # the follower's place in the stream is taken
        for index in range(5):
            publisher.publish("c-1", delta(index))
        expected = [delta(index) for index in range(5)]
        assert expected == await take(live, 5)
        assert expected == await take(watcher.follow("c-1", from_start=True), 5)
    finally:
        await publisher.close()
        await watcher.close()


def test_both_buses_are_live_buses() -> None:
    """Both implement the LiveBus protocol."""
    buses: list[LiveBus] = [MemoryLiveBus(), RedisLiveBus()]
    assert 2 == len(buses)
