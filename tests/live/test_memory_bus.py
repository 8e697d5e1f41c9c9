"""What only the in-memory bus promises: idle buffers expire, at most max_conversations kept."""

from __future__ import annotations

import asyncio

import pytest

from tests.live.conftest import delta, take
from tokenwire.live import MemoryLiveBus


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_buffer_nobody_follows_is_dropped_retain_s_after_its_last_event() -> None:
    """Past retain_s, the next publish forgets the idle conversation; a replay finds nothing."""
    clock = Clock()
    bus = MemoryLiveBus(retain_s=300.0, clock=clock)
    bus.publish("c-old", delta(0))
    clock.now += 299.0
    bus.publish("c-new", delta(0))
    assert 2 == bus.conversations
    clock.now += 2.0
    bus.publish("c-new", delta(1))
    assert 1 == bus.conversations
    replay = bus.follow("c-old", from_start=True)
    bus.publish("c-old", delta(9))
    assert [delta(9)] == await take(replay, 1)


async def test_a_followed_conversation_is_kept_past_retain_s() -> None:
    """A buffer with a follower survives expiry; once the follower leaves, it expires in turn."""
    clock = Clock()
    bus = MemoryLiveBus(retain_s=10.0, clock=clock)
    follower = bus.follow("c-1", from_start=True)
    bus.publish("c-1", delta(0))
    assert [delta(0)] == await take(follower, 1)
    clock.now += 60.0
    bus.publish("c-2", delta(0))
    assert 2 == bus.conversations
    await follower.aclose()
    clock.now += 11.0
    bus.publish("c-2", delta(1))
    assert 1 == bus.conversations


async def test_at_most_max_conversations_are_kept_least_recently_used_dropped_first() -> None:
    """The conversation published to longest ago goes first; a followed one is never dropped."""
    bus = MemoryLiveBus(max_conversations=2)
    follower = bus.follow("c-followed", from_start=True)
    bus.publish("c-followed", delta(0))
    bus.publish("c-a", delta(0))
    bus.publish("c-b", delta(0))
    assert 2 == bus.conversations
    assert [delta(0)] == await take(follower, 1)
    replay_a = bus.follow("c-a", from_start=True)
    bus.publish("c-a", delta(1))
    assert [delta(1)] == await take(replay_a, 1)


async def test_a_follower_that_stops_lets_an_empty_conversation_go() -> None:
    """A follower of a conversation without events leaves nothing behind when it stops."""
    bus = MemoryLiveBus()
    follower = bus.follow("c-1")
    bus.publish("c-2", delta(0))
    assert 2 == bus.conversations
    reading = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert 1 == bus.conversations


async def test_at_most_max_events_are_buffered_in_all() -> None:
    """Past max_events in all, the least recently used buffers nobody follows go first."""
    bus = MemoryLiveBus(buffer_events=16, max_events=40)
    follower = bus.follow("c-followed", from_start=True)
    for i in range(10):
        bus.publish("c-followed", delta(i))
    for name in ("c-a", "c-b", "c-c"):
        for i in range(12):
            bus.publish(name, delta(i))
    assert 3 == bus.conversations  # c-a was dropped to make room; the followed one stays
    replay = bus.follow("c-a", from_start=True)
    bus.publish("c-a", delta(99))
    assert [delta(99)] == await take(replay, 1)
    assert [delta(0)] == await take(follower, 1)
