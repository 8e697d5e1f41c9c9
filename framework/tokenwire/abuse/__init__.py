"""Account-level abuse signals: moderation flags counted per principal, throttles, suspensions.

* :class:`AbuseConfig` (``[abuse]``): the window, the thresholds, the store;
* :class:`AbuseStore`: counts, standings, throttle buckets and per-tenant policies —
  :class:`MemoryAbuseStore` in one process, :class:`RedisAbuseStore` shared by
  every gateway (one Lua script and one round trip per operation);
* :class:`~tokenwire.abuse.monitor.AbuseMonitor`: moderation's flag sink and
  tenant overrides; caches standings; keeps every flag event in the conversation
  database (:mod:`tokenwire.stores.moderation_events`);
* :class:`~tokenwire.abuse.interceptor.SuspensionInterceptor` (every call, right
  after authentication) and :class:`~tokenwire.abuse.policy.AbusePolicy` (every
  turn, before quotas) enforce them; ``AdminService`` lists events, reads and lifts
  standings, and sets tenant policies.

The monitor, interceptor and policy load on first use (``tokenwire.config``
imports this package for its section, and must not pull in the call machinery)::

    monitor = build_abuse_monitor(config.abuse, config.quotas, events=conversation_store)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenwire.abuse.config import ABUSE_STORES, AbuseConfig
from tokenwire.abuse.memory import MemoryAbuseStore
from tokenwire.abuse.store import (
    GOOD_STANDING,
    AbuseRules,
    AbuseStore,
    AbuseStoreError,
    Account,
    Flag,
    Standing,
    TenantPolicy,
)
from tokenwire.quotas.config import QuotaConfig

if TYPE_CHECKING:
    from tokenwire.abuse.interceptor import SuspensionInterceptor
    from tokenwire.abuse.monitor import AbuseMonitor
    from tokenwire.abuse.policy import AbusePolicy
    from tokenwire.abuse.redis import RedisAbuseStore
    from tokenwire.abuse.refusals import AccountSuspendedError, AccountThrottledError

__all__ = [
    "ABUSE_STORES",
    "GOOD_STANDING",
    "AbuseConfig",
    "AbuseMonitor",
    "AbusePolicy",
    "AbuseRules",
    "AbuseStore",
    "AbuseStoreError",
    "Account",
    "AccountSuspendedError",
    "AccountThrottledError",
    "Flag",
    "MemoryAbuseStore",
    "RedisAbuseStore",
    "Standing",
    "SuspensionInterceptor",
    "TenantPolicy",
    "build_abuse_monitor",
    "create_abuse_store",
]

_LAZY = {
    "AbuseMonitor": "tokenwire.abuse.monitor",
    "AbusePolicy": "tokenwire.abuse.policy",
    "AccountSuspendedError": "tokenwire.abuse.refusals",
    "AccountThrottledError": "tokenwire.abuse.refusals",
    "RedisAbuseStore": "tokenwire.abuse.redis",
    "SuspensionInterceptor": "tokenwire.abuse.interceptor",
}


def create_abuse_store(config: AbuseConfig, quotas: QuotaConfig) -> AbuseStore:
    """The store ``config.store`` names (empty: ``quotas.store``; on ``quotas.redis_url``
    and under ``quotas.key_prefix`` + ``abuse:`` unless ``config.redis_url`` and
    ``config.key_prefix`` say otherwise), not yet started."""
    if config.store_kind(quotas.store) == "redis":
        from tokenwire.abuse.redis import RedisAbuseStore

        return RedisAbuseStore(
            config.redis_url_or(quotas.redis_url),
            config.rules,
            key_prefix=config.key_prefix_or(quotas.key_prefix),
            timeout_s=config.redis_timeout_s,
        )
    return MemoryAbuseStore(config.rules)


def build_abuse_monitor(
    config: AbuseConfig, quotas: QuotaConfig, *, events: object = None
) -> AbuseMonitor | None:
    """The monitor ``config`` asks for over its own store (None when ``config.enabled`` is
    false); flag events are kept in ``events`` when it is a moderation event store (the
    SQLite and PostgreSQL conversation stores are)."""
    if not config.enabled:
        return None
    from tokenwire.abuse.monitor import AbuseMonitor
    from tokenwire.stores.moderation_events import ModerationEventStore

    keeper = events if isinstance(events, ModerationEventStore) else None
    return AbuseMonitor(config, create_abuse_store(config, quotas), events=keeper)


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
