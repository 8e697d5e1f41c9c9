"""Quotas: requests, tokens and concurrent streams per principal and per tenant.

The policy (plans, windows) is :class:`QuotaConfig`; the counters live in a
:class:`QuotaStore` — :class:`MemoryQuotaStore` in one process (the embedded
default) or :class:`RedisQuotaStore` shared by many gateways. Per call the
:class:`~tokenwire.quotas.interceptor.QuotaInterceptor` enforces them, per turn
the :class:`~tokenwire.quotas.policy.QuotaPolicy`.

    store = create_quota_store(QuotaConfig(store="redis"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenwire.quotas.config import PlanLimits, QuotaConfig, parse_plan, parse_plans
from tokenwire.quotas.memory import MemoryQuotaStore
from tokenwire.quotas.store import (
    ALLOWED,
    Admission,
    Budget,
    BudgetCharge,
    BudgetStore,
    Lease,
    QuotaStore,
    QuotaStoreError,
    Rate,
    Reservation,
    Slot,
    Verdict,
)

if TYPE_CHECKING:
    from tokenwire.quotas.redis import RedisQuotaStore

__all__ = [
    "ALLOWED",
    "Admission",
    "Budget",
    "BudgetCharge",
    "BudgetStore",
    "Lease",
    "MemoryQuotaStore",
    "PlanLimits",
    "QuotaConfig",
    "QuotaStore",
    "QuotaStoreError",
    "Rate",
    "RedisQuotaStore",
    "Reservation",
    "Slot",
    "Verdict",
    "create_quota_store",
    "parse_plan",
    "parse_plans",
]


def create_quota_store(config: QuotaConfig) -> QuotaStore:
    """The store ``config.store`` names, not yet started."""
    if config.store == "redis":
        from tokenwire.quotas.redis import RedisQuotaStore

        return RedisQuotaStore(
            config.redis_url,
            key_prefix=config.key_prefix,
            lease_ttl_s=config.lease_ttl_s,
            timeout_s=config.redis_timeout_s,
        )
    return MemoryQuotaStore()


def __getattr__(name: str) -> object:
    # The Redis store imports redis.asyncio; only load it when it is asked for.
    if name == "RedisQuotaStore":
        from tokenwire.quotas.redis import RedisQuotaStore

        return RedisQuotaStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
