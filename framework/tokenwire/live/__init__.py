"""Live turn events fanned out to every follower of a conversation, across devices and gateways.

A turn publishes its events (:class:`LiveEvent`) to a :class:`LiveBus`; watchers of
the conversation, and a client resuming the turn, follow them. The bus is
:class:`MemoryLiveBus` in one process or :class:`RedisLiveBus` shared by every
gateway (``store.live``).

    bus = live_bus_from_config(config.store)
    await bus.open()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenwire.live.bus import Lagged, LiveBus, LiveEvent, MemoryLiveBus

if TYPE_CHECKING:
    from tokenwire.config import StoreConfig
    from tokenwire.live.redis_bus import RedisLiveBus

__all__ = [
    "Lagged",
    "LiveBus",
    "LiveEvent",
    "MemoryLiveBus",
    "RedisLiveBus",
    "live_bus_from_config",
]


def live_bus_from_config(config: StoreConfig) -> LiveBus:
    """The bus ``config.live`` names, not yet open.

    bus = live_bus_from_config(StoreConfig(live="redis"))
    """
    if config.live == "redis":
        from tokenwire.live.redis_bus import RedisLiveBus

        return RedisLiveBus(config.live_redis_url, buffer_events=config.live_buffer_events)
    return MemoryLiveBus(buffer_events=config.live_buffer_events)


def __getattr__(name: str) -> object:
    # The Redis bus imports redis.asyncio; only load it when it is asked for.
    if name == "RedisLiveBus":
        from tokenwire.live.redis_bus import RedisLiveBus

        return RedisLiveBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
