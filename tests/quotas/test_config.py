"""QuotaConfig: plans from TOML tables and from the environment's string form."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from tokenwire import config as config_module
from tokenwire.errors import ConfigError
from tokenwire.quotas import PlanLimits, QuotaConfig, parse_plan

TOML = """
[quotas]
store = "redis"
default_plan = "free"
tenant_default_plan = "team"

[quotas.plans.free]
requests_per_minute = 60
tokens_per_minute = 40000
concurrent_streams = 4

[quotas.plans.team]
rpm = 600
streams = 32

[quotas.tenant_plans]
acme = "free"
"""


def test_defaults_limit_nothing() -> None:
    """Out of the box the one plan, 'default', is unlimited and the store is in memory."""
    config = QuotaConfig()
    config.validate()
    assert "memory" == config.store
    assert {"default": PlanLimits()} == dict(config.plans)
    assert config.plan_of("anything").unlimited
    assert config.tenant_limits("acme").unlimited


def test_plans_from_toml_tables() -> None:
    """A [quotas] table with [quotas.plans.NAME] sub-tables builds the config directly."""
    config = QuotaConfig(**tomllib.loads(TOML)["quotas"])
    config.validate()
    assert PlanLimits(60, 40000, 4) == config.plans["free"]
    assert PlanLimits(requests_per_minute=600, concurrent_streams=32) == config.plans["team"]
    assert config.plans["free"] == config.tenant_limits("acme")
    assert config.plans["team"] == config.tenant_limits("globex")


def test_plans_survive_the_generic_config_loader() -> None:
    """The loader's per-field coercion (tables become strings) still yields the same plans."""
    tables = tomllib.loads(TOML)["quotas"]
    loaded = QuotaConfig()
    for key, value in tables.items():
        loaded = config_module._apply(QuotaConfig, loaded, {key: value}, "test")
    assert QuotaConfig(**tables) == loaded


def test_plans_and_tenant_plans_from_environment_strings() -> None:
    """Env form: 'NAME=rpm:60 tpm:40000 streams:4,...' and 'tenant=plan,...'."""
    env = {
        "plans": "default=rpm:60 tpm:40000 streams:4, team=requests_per_minute:600;streams:32",
        "tenant_plans": "acme=team,globex=default",
    }
    loaded = QuotaConfig()
    for key, value in env.items():
        loaded = config_module._apply(QuotaConfig, loaded, {key: value}, "env")
    loaded.validate()
    assert PlanLimits(60, 40000, 4) == loaded.plans["default"]
    assert PlanLimits(600, 0, 32) == loaded.plans["team"]
    assert {"acme": "team", "globex": "default"} == dict(loaded.tenant_plans)


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("rpm:ten", "not an integer"),
        ("rpm:-1", ">= 0"),
        ("bananas:3", "unknown limit 'bananas'"),
        ("rpm", "expected 'name:number' items"),
    ],
)
def test_bad_plan_strings_name_the_problem(spec: str, complaint: str) -> None:
    """A malformed plan is a ConfigError that says what is wrong."""
    with pytest.raises(ConfigError, match=complaint):
        parse_plan(spec, "quotas.plans.x")


def test_plans_named_elsewhere_must_exist() -> None:
    """default_plan and tenant plans must name configured plans (checked by validate)."""
    with pytest.raises(ConfigError, match="default_plan 'gold' is not a plan"):
        QuotaConfig(default_plan="gold").validate()
    with pytest.raises(ConfigError, match=r"tenant_plans\.acme: 'gold' is not a plan"):
        QuotaConfig(tenant_plans={"acme": "gold"}).validate()


def test_unknown_store_and_bad_numbers_are_refused() -> None:
    """The store is memory or redis; windows and TTLs are positive."""
    with pytest.raises(ConfigError, match="'memory' or 'redis'"):
        QuotaConfig(store="etcd")
    with pytest.raises(ConfigError, match="window_s must be a positive number"):
        QuotaConfig(window_s=0)


def test_unknown_principal_plans_fall_back_to_the_default_plan() -> None:
    """A principal on a plan the config does not know gets default_plan's limits."""
    config = QuotaConfig(plans={"default": "rpm:5", "pro": "rpm:50"})
    assert 50 == config.plan_of("pro").requests_per_minute
    assert 5 == config.plan_of("platinum").requests_per_minute


def test_every_field_has_help() -> None:
    """Each setting carries the one-line description that becomes its help text."""
    for cls in (QuotaConfig, PlanLimits):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
