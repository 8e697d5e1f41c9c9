"""The ``[abuse]`` section: how moderation flags add up to a throttle or a suspension.

Every flag whose action is ``block`` or ``log`` counts against its principal
(tenant and user) for ``window_s`` seconds; ``allow`` flags are kept and listed,
never counted. At ``throttle_after`` flags in the window the principal may start
only ``throttle_turns_per_minute`` turns per ``throttle_window_s``; at
``suspend_after`` every call it makes is refused until the suspension ends
(``suspend_s``) or an admin lifts it::

    [abuse]
    window_s = 3600
    throttle_after = 3
    throttle_turns_per_minute = 2
    suspend_after = 10
    suspend_s = 0             # until AdminService.LiftSuspension

The counts live in the ``store`` (by default the one ``quotas.store`` names, on
``quotas.redis_url``, under ``quotas.key_prefix`` + ``abuse:``): ``memory`` for
one process, ``redis`` for every gateway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenwire.abuse.store import AbuseRules
from tokenwire.config_fields import require_positive, setting
from tokenwire.errors import ConfigError

__all__ = ["ABUSE_STORES", "AbuseConfig"]

ABUSE_STORES = ("memory", "redis")


@dataclass(frozen=True, slots=True)
class AbuseConfig:
    """Account-level abuse signals: flags counted per principal, throttles, suspensions."""

    enabled: bool = setting(
        True,
        "count moderation flags per principal, throttle and suspend repeat offenders, "
        "keep flag events and per-tenant moderation policies",
    )
    window_s: float = setting(
        3600.0, "seconds a flag counts against its principal (a sliding window)"
    )
    throttle_after: int = setting(
        5, "flags in the window at which the principal is throttled; 0: never"
    )
    throttle_turns_per_minute: int = setting(
        2,
        "turns a throttled principal may start per throttle_window_s; beyond it "
        "RESOURCE_EXHAUSTED with a retry delay",
    )
    throttle_window_s: float = setting(
        60.0, "seconds throttle_turns_per_minute applies to (60: per minute)"
    )
    suspend_after: int = setting(
        20,
        "flags in the window at which the principal is suspended: every call "
        "PERMISSION_DENIED; 0: never",
    )
    suspend_s: float = setting(
        86400.0, "how long a suspension lasts, in seconds; 0: until an admin lifts it"
    )
    store: str = setting(
        "",
        "'memory' (this process only) or 'redis' (shared by every gateway); "
        "empty: the same as quotas.store",
    )
    redis_url: str = setting("", "Redis server for store = 'redis'; empty: quotas.redis_url")
    redis_timeout_s: float = setting(
        1.0, "seconds a Redis connect or command may take before the store counts as down"
    )
    key_prefix: str = setting(
        "", "prefix of every Redis key abuse signals use; empty: quotas.key_prefix + 'abuse:'"
    )
    standing_cache_s: float = setting(
        1.0,
        "seconds a gateway answers from its cached standing of a principal before "
        "reading it again (a suspension made on another gateway reaches it within this)",
    )
    policy_refresh_s: float = setting(
        2.0,
        "seconds between reloads of the per-tenant moderation policies set through "
        "AdminService (another gateway's change applies within this)",
    )
    fail_open: bool = setting(
        True,
        "when the abuse store is unreachable: true serves on the last known standing, "
        "false refuses calls UNAVAILABLE",
    )

    def __post_init__(self) -> None:
        if self.store not in ("", *ABUSE_STORES):
            raise ConfigError(f"abuse.store must be 'memory', 'redis' or empty, got {self.store!r}")
        for name in ("throttle_after", "throttle_turns_per_minute", "suspend_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"abuse.{name} must be an integer >= 0, got {value!r}")
        if self.throttle_after and self.throttle_turns_per_minute < 1:
            raise ConfigError(
                "abuse.throttle_turns_per_minute must be >= 1 while throttle_after is set; "
                "to stop a principal altogether, lower suspend_after"
            )
        require_positive("abuse", self, "window_s", "throttle_window_s", "redis_timeout_s")
        require_positive("abuse", self, "policy_refresh_s")
        for name in ("suspend_s", "standing_cache_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"abuse.{name} must be a number >= 0, got {value!r}")

    @property
    def rules(self) -> AbuseRules:
        """The thresholds the store applies."""
        return AbuseRules(
            window_s=self.window_s,
            throttle_after=self.throttle_after,
            suspend_after=self.suspend_after,
            suspend_s=self.suspend_s,
            throttle_turns=self.throttle_turns_per_minute,
            throttle_window_s=self.throttle_window_s,
        )

    def store_kind(self, quotas_store: str) -> str:
        """The store to use: ``store``, or ``quotas_store`` when it is empty."""
        return self.store or quotas_store

    def redis_url_or(self, quotas_redis_url: str) -> str:
        """The Redis URL to use: ``redis_url``, or ``quotas_redis_url`` when it is empty."""
        return self.redis_url or quotas_redis_url

    def key_prefix_or(self, quotas_key_prefix: str) -> str:
        """The key prefix to use: ``key_prefix``, or ``quotas_key_prefix`` + ``abuse:``
        when it is empty (one namespace per deployment, cleared together)."""
        return self.key_prefix or f"{quotas_key_prefix}abuse:"
