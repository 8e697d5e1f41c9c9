"""Live bus test kit: each bus, fresh per test, and readers for what followers get.

The ``make_bus`` fixture runs a test once per bus: in memory, and on the Redis
server of ``tests/conftest.py`` under a key prefix of the test's own, deleted
afterwards. When Redis is unreachable the Redis runs skip, or fail with
``TOKENWIRE_TEST_REQUIRE_SERVICES`` set.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.conftest import REDIS_URL, redis_key_prefix
from tokenwire.live import LiveEvent, MemoryLiveBus
from tokenwire.live.bus import Lagged
from tokenwire.live.redis_bus import RedisLiveBus

BUSES = ["memory", "redis"]
Bus = MemoryLiveBus | RedisLiveBus
MakeBus = Callable[..., Any]  # (**options) -> Awaitable[Bus]


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A fresh Redis key prefix (Redis required), its keys deleted after the test."""
    async with redis_key_prefix("live") as prefix:
        yield prefix


@pytest.fixture(params=BUSES)
async def make_bus(request: pytest.FixtureRequest) -> AsyncIterator[MakeBus]:
    """Opens buses of one kind; Redis ones share a key prefix of this test's own."""
    kind: str = request.param
    async with contextlib.AsyncExitStack() as stack:
        prefix = ""
        if kind == "redis":
            prefix = await stack.enter_async_context(redis_key_prefix("live"))
        opened: list[Bus] = []

        async def make(**options: Any) -> Bus:
            bus: Bus
            if kind == "memory":
                bus = MemoryLiveBus(**options)
            else:
                bus = RedisLiveBus(REDIS_URL, key_prefix=prefix, **options)
            await bus.open()
            opened.append(bus)
            return bus

        try:
            yield make
        finally:  # before the prefix's keys are deleted
            for bus in opened:
                await bus.close()


def delta(index: int, turn_id: str = "t-1") -> LiveEvent:
    """The ``index``-th delta of a turn: its text is the index."""
    return LiveEvent("delta", turn_id, text=str(index), token_count=1)


async def take(
    follower: AsyncIterator[LiveEvent | Lagged], count: int, limit_s: float = 5.0
) -> list[LiveEvent | Lagged]:
    """The follower's next ``count`` items; fails after ``limit_s`` seconds."""

    async def read() -> list[LiveEvent | Lagged]:
        return [await anext(follower) for _ in range(count)]

    return await asyncio.wait_for(read(), limit_s)


async def nothing_more(follower: AsyncIterator[LiveEvent | Lagged], wait_s: float = 0.2) -> bool:
    """True when the follower yields nothing within ``wait_s`` seconds."""
    try:
        await asyncio.wait_for(anext(follower), wait_s)
    except TimeoutError:
        return True
    return False
