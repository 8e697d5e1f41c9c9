"""The [abuse] section: defaults, validation, and the store it falls back on."""

from __future__ import annotations

from typing import Any

import pytest

from tokenwire.abuse import (
    AbuseConfig,
    AbuseRules,
    MemoryAbuseStore,
    build_abuse_monitor,
    create_abuse_store,
)
from tokenwire.abuse.redis import RedisAbuseStore
from tokenwire.config import load_config
from tokenwire.errors import ConfigError
from tokenwire.quotas import QuotaConfig


def test_the_defaults_follow_the_quota_store() -> None:
    """Empty store, redis_url and key_prefix mean quotas.store, quotas.redis_url, and
    quotas.key_prefix + 'abuse:'."""
    config = AbuseConfig()
    quotas = QuotaConfig(store="redis", redis_url="redis://quotas:6379/2", key_prefix="tw:q:")
    store = create_abuse_store(config, quotas)
    assert isinstance(store, RedisAbuseStore)
    assert "tw:q:abuse:" == store.key_prefix
    assert "own:" == AbuseConfig(key_prefix="own:").key_prefix_or(quotas.key_prefix)
    assert isinstance(create_abuse_store(config, QuotaConfig()), MemoryAbuseStore)
    assert "redis://quotas:6379/2" == config.redis_url_or(quotas.redis_url)
    assert "redis://own:6379/0" == AbuseConfig(redis_url="redis://own:6379/0").redis_url_or(
        quotas.redis_url
    )


def test_its_own_store_wins_over_the_quota_store() -> None:
    """abuse.store = 'memory' keeps the counts in the process though quotas use Redis."""
    store = create_abuse_store(AbuseConfig(store="memory"), QuotaConfig(store="redis"))
    assert isinstance(store, MemoryAbuseStore)


def test_the_rules_carry_the_thresholds() -> None:
    """AbuseConfig.rules is what the store applies."""
    config = AbuseConfig(
        window_s=60, throttle_after=2, suspend_after=4, suspend_s=30,
        throttle_turns_per_minute=5, throttle_window_s=10,
    )  # fmt: skip
    assert AbuseRules(60, 2, 4, 30, 5, 10) == config.rules


def test_no_monitor_when_disabled() -> None:
    """abuse.enabled = false builds nothing."""
    assert build_abuse_monitor(AbuseConfig(enabled=False), QuotaConfig()) is None


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"store": "etcd"}, "abuse.store"),
        ({"throttle_after": -1}, "abuse.throttle_after"),
        ({"suspend_after": True}, "abuse.suspend_after"),
        ({"throttle_turns_per_minute": 0}, "abuse.throttle_turns_per_minute"),
        ({"window_s": 0}, "abuse.window_s"),
        ({"throttle_window_s": -5}, "abuse.throttle_window_s"),
        ({"suspend_s": -1}, "abuse.suspend_s"),
        ({"standing_cache_s": float("nan")}, "abuse.standing_cache_s"),
        ({"policy_refresh_s": 0}, "abuse.policy_refresh_s"),
    ],
)
def test_bad_settings_are_refused_by_name(fields: dict[str, Any], named: str) -> None:
    """Each bad value is a ConfigError naming its setting."""
    with pytest.raises(ConfigError, match=named):
        AbuseConfig(**fields)


def test_no_throttle_needs_no_throttle_rate() -> None:
    """throttle_after = 0 turns the throttle off, whatever its rate says."""
    assert 0 == AbuseConfig(throttle_after=0, throttle_turns_per_minute=0).rules.throttle_after


def test_the_section_loads_from_the_environment() -> None:
    """TOKENWIRE_ABUSE_* set the section like any other."""
    config = load_config(
        env={"TOKENWIRE_ABUSE_SUSPEND_AFTER": "7", "TOKENWIRE_ABUSE_STORE": "redis"}
    )
    assert (7, "redis") == (config.abuse.suspend_after, config.abuse.store)
