"""Quota configuration: plans of limits, applied per principal and per tenant.

A plan names three limits; 0 means unlimited. Every principal gets the limits of
its plan (``Principal.plan``; unknown plans fall back to ``default_plan``), and
every tenant may share one more set of limits among all its principals: the plan
named for it in ``tenant_plans``, else ``tenant_default_plan`` (empty: none).

    [quotas]
    store = "redis"
    tenant_default_plan = "team"

    [quotas.plans.default]
    requests_per_minute = 60
    tokens_per_minute = 40000
    concurrent_streams = 4

    [quotas.plans.team]
    requests_per_minute = 600
    tokens_per_minute = 400000
    concurrent_streams = 32

    [quotas.tenant_plans]
    acme = "team"

In the environment (and anywhere a string is given), a plan is written
``name=rpm:60 tpm:40000 streams:4`` (the long field names work too), plans
separated by commas:

    TOKENWIRE_QUOTAS_PLANS="default=rpm:60 tpm:40000 streams:4,team=rpm:600 streams:32"
    TOKENWIRE_QUOTAS_TENANT_PLANS="acme=team,globex=team"

The limits called ``*_per_minute`` hold per ``window_s`` seconds (60 by default).
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenwire.config_fields import parse_pairs, require_positive, setting
from tokenwire.errors import ConfigError

__all__ = ["PLAN_FIELDS", "PlanLimits", "QuotaConfig", "parse_plan", "parse_plans"]

_STORES = ("memory", "redis")
_SHORT_NAMES = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "streams": "concurrent_streams",
}


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """The limits of one plan; 0 means unlimited."""

    requests_per_minute: int = setting(
        0, "calls per window (each Converse StartTurn is one; the stream itself is not)"
    )
    tokens_per_minute: int = setting(
        0, "prompt plus completion tokens per window (reserved at max_tokens, then settled)"
    )
    concurrent_streams: int = setting(0, "streaming calls open at once")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{f.name} must be an integer >= 0 (0: unlimited), got {value!r}")

    @property
    def unlimited(self) -> bool:
        """True when the plan limits nothing."""
        return not (self.requests_per_minute or self.tokens_per_minute or self.concurrent_streams)


PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(PlanLimits))
_ITEM = re.compile(r"[\s;]+")


def parse_plan(value: PlanLimits | Mapping[str, Any] | str, where: str = "plan") -> PlanLimits:
    """A plan from a TOML table, a mapping, or the string form ``rpm:60 tpm:40000 streams:4``."""
    if isinstance(value, PlanLimits):
        return value
    if isinstance(value, str):
        text = value.strip()
        items: dict[str, Any] = {}
        for item in _ITEM.split(text):
            if not item:
                continue
            name, sep, number = item.partition(":")
            if not sep:
                name, sep, number = item.partition("=")
            if not sep:
                raise ConfigError(
                    f"{where}: expected 'name:number' items like 'rpm:60 tpm:40000 streams:4', "
                    f"got {item!r}"
                )
            items[name.strip()] = number.strip()
        value = items
    limits: dict[str, int] = {}
    for key, number in value.items():
        name = _SHORT_NAMES.get(str(key), str(key).replace("-", "_"))
        if name not in PLAN_FIELDS:
            known = ", ".join((*PLAN_FIELDS, *_SHORT_NAMES))
            raise ConfigError(f"{where}: unknown limit {key!r}; known: {known}")
        if isinstance(number, bool):
            raise ConfigError(f"{where}.{name}: not a number: {number!r}")
        try:
            limits[name] = int(number)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.{name}: not an integer: {number!r}") from exc
    try:
        return PlanLimits(**limits)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def parse_plans(
    value: Mapping[str, Any] | str, where: str = "quotas.plans"
) -> dict[str, PlanLimits]:
    """Plans by name from a TOML table of tables, or ``name=rpm:60 streams:4,other=...``."""
    if isinstance(value, str):
        value = parse_pairs(value, where, "name=rpm:60 tpm:40000,...")
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table of plans, got {value!r}")
    return {str(name): parse_plan(spec, f"{where}.{name}") for name, spec in value.items()}


def _default_plans() -> Mapping[str, PlanLimits]:
    return types.MappingProxyType({"default": PlanLimits()})


def _no_tenant_plans() -> Mapping[str, str]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """Quotas: requests, tokens and concurrent streams per principal and per tenant."""

    enabled: bool = setting(True, "apply quotas; false admits every call uncounted")
    store: str = setting(
        "memory", "'memory' (this process only) or 'redis' (one budget shared by all gateways)"
    )
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis server for store = 'redis'")
    redis_timeout_s: float = setting(
        1.0, "seconds a Redis connect or command may take before the store counts as down"
    )
    key_prefix: str = setting("tokenwire:quota:", "prefix of every Redis key the quotas use")
    window_s: float = setting(
        60.0, "seconds the *_per_minute limits apply to (60: per minute); buckets refill evenly"
    )
    plans: Mapping[str, PlanLimits] = field(
        default_factory=_default_plans,
        metadata={
            "help": "plan name -> limits, as [quotas.plans.NAME] tables or "
            "'NAME=rpm:60 tpm:40000 streams:4,...'; 0 or absent: unlimited"
        },
    )
    default_plan: str = setting(
        "default", "plan for principals whose plan is not in plans (must be in plans)"
    )
    tenant_plans: Mapping[str, str] = field(
        default_factory=_no_tenant_plans,
        metadata={"help": "tenant -> plan whose limits all the tenant's principals share"},
    )
    tenant_default_plan: str = setting(
        "", "shared plan of tenants not in tenant_plans; empty: no tenant-wide limits"
    )
    lease_ttl_s: float = setting(
        30.0,
        "Redis: a stream's slot expires this long after its gateway last renewed it "
        "(renewed every third of it), so a crashed gateway's slots free within it",
    )
    concurrency_retry_s: float = setting(
        1.0, "retry delay advised when all stream slots are taken (streams end unforeseeably)"
    )
    fail_open: bool = setting(
        False, "when the quota store is unreachable: true admits calls, false refuses UNAVAILABLE"
    )

    def __post_init__(self) -> None:
        plans = parse_plans(self.plans)
        object.__setattr__(self, "plans", types.MappingProxyType(plans))
        given: object = self.tenant_plans  # a string too, from the environment
        if isinstance(given, str):
            given = parse_pairs(given, "quotas.tenant_plans", "tenant=plan,...")
        if not isinstance(given, Mapping):
            raise ConfigError(f"quotas.tenant_plans: expected a table, got {given!r}")
        tenant_plans = {str(k): str(v) for k, v in given.items()}
        object.__setattr__(self, "tenant_plans", types.MappingProxyType(tenant_plans))
        if self.store not in _STORES:
            raise ConfigError(f"quotas.store must be 'memory' or 'redis', got {self.store!r}")
        require_positive(
            "quotas", self, "window_s", "lease_ttl_s", "redis_timeout_s", "concurrency_retry_s"
        )

    def validate(self) -> None:
        """Check the plans that other fields name; raises ConfigError.

        Separate from construction because a config loader sets fields one at a
        time, and ``default_plan`` may name a plan that a later field brings.
        """
        if self.default_plan not in self.plans:
            raise ConfigError(
                f"quotas.default_plan {self.default_plan!r} is not a plan; "
                f"plans: {', '.join(self.plans) or 'none'}"
            )
        for tenant, plan in {**self.tenant_plans, "": self.tenant_default_plan}.items():
            if plan and plan not in self.plans:
                where = f"tenant_plans.{tenant}" if tenant else "tenant_default_plan"
                raise ConfigError(f"quotas.{where}: {plan!r} is not a plan")

    def plan_of(self, plan: str) -> PlanLimits:
        """The limits a principal on ``plan`` gets (``default_plan`` when unknown)."""
        limits = self.plans.get(plan)
        return limits if limits is not None else self.plans.get(self.default_plan, _UNLIMITED)

    def tenant_limits(self, tenant: str) -> PlanLimits:
        """The limits ``tenant``'s principals share (unlimited when none is configured)."""
        plan = self.tenant_plans.get(tenant, self.tenant_default_plan)
        return self.plans.get(plan, _UNLIMITED) if plan else _UNLIMITED


_UNLIMITED = PlanLimits()
