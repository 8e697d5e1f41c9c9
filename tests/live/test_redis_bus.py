"""What only the Redis bus promises: UnavailableError, a bounded write queue, capped streams."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL
from tests.live.conftest import delta, take
from tokenwire.config import StoreConfig
from tokenwire.errors import UnavailableError
from tokenwire.live import LiveEvent, MemoryLiveBus, live_bus_from_config
from tokenwire.live.bus import decode_event, encode_event
from tokenwire.live.redis_bus import RedisLiveBus


def test_live_bus_from_config_picks_the_configured_bus() -> None:
    """store.live chooses the bus; nothing connects before open()."""
    assert MemoryLiveBus is type(live_bus_from_config(StoreConfig()))
    redis_bus = live_bus_from_config(StoreConfig(live="redis", live_redis_url="redis://h:1/0"))
    assert RedisLiveBus is type(redis_bus)


def test_an_event_is_encoded_with_its_non_default_fields_only() -> None:
    """The stored entry is compact JSON that decodes to the same event."""
    event = LiveEvent("delta", "t-1", text="hi", token_count=1)
    assert b'{"kind":"delta","turn_id":"t-1","text":"hi","token_count":1}' == encode_event(event)
    assert event == decode_event(encode_event(event))


async def test_an_unreachable_redis_is_unavailable_and_named_without_its_password() -> None:
    """open() fails with UnavailableError naming host and port, never the password."""
    bus = RedisLiveBus("redis://alice:s3cret@127.0.0.1:1/0", timeout_s=1.0)
    with pytest.raises(UnavailableError) as raised:
        await bus.open()
    assert "redis://127.0.0.1:1/0" in str(raised.value)
    assert "s3cret" not in str(raised.value)


async def test_follow_before_open_is_unavailable() -> None:
    """A follower of a bus never opened fails instead of waiting forever."""
    with pytest.raises(UnavailableError):
        await anext(RedisLiveBus(REDIS_URL).follow("c-1"))


async def test_a_full_write_queue_drops_events_without_raising(redis_prefix: str) -> None:
    """Past queue_events waiting, publish() drops; what was queued is written at open()."""
    bus = RedisLiveBus(REDIS_URL, key_prefix=redis_prefix, queue_events=2)
    for index in range(5):
        bus.publish("c-1", delta(index))
    await bus.open()
    try:
        await bus.flush()  # the queue is empty again: publishing works
        bus.publish("c-1", delta(5))
        replay = bus.follow("c-1", from_start=True)
        assert [delta(0), delta(1), delta(5)] == await take(replay, 3)
    finally:
        await bus.close()


async def test_streams_are_capped_and_expire(redis_prefix: str) -> None:
    """Each conversation's stream keeps about buffer_events entries and expires after retain_s."""
    bus = RedisLiveBus(REDIS_URL, key_prefix=redis_prefix, buffer_events=100, retain_s=60.0)
    await bus.open()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        for index in range(1000):
            bus.publish("c-1", delta(index))
        await bus.flush()
        length = await client.xlen(f"{redis_prefix}c-1")
        ttl_ms = await client.pttl(f"{redis_prefix}c-1")
        assert 100 <= length < 1000
        assert 0 < ttl_ms <= 60_000
    finally:
        await client.aclose()
        await bus.close()


async def test_a_follower_whose_connection_drops_gets_unavailable(redis_prefix: str) -> None:
    """Killing the follower's blocked connection ends its iterator with UnavailableError."""
    name = f"tokenwire-test-{uuid.uuid4().hex}"
    url = f"{REDIS_URL}?client_name={name}"
    bus = RedisLiveBus(url, key_prefix=redis_prefix, block_ms=5000)
    await bus.open()
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        follower = bus.follow("c-1")
        bus.publish("c-1", delta(0))
        assert [delta(0)] == await take(follower, 1)
        waiting = asyncio.ensure_future(anext(follower))
        blocked: list[str] = []
        for _ in range(500):
            clients = await admin.client_list()
            blocked = [str(c["id"]) for c in clients if c["name"] == name and c["cmd"] == "xread"]
            if blocked:
                break
            await asyncio.sleep(0.01)
        assert 1 == len(blocked)
        await admin.client_kill_filter(_id=blocked[0])
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(waiting, 5.0)
    finally:
        await admin.aclose()
        await bus.close()
