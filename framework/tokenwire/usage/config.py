"""The ``[usage]`` section: token accounting, prices and budgets.

    [usage]
    currency = "EUR"
    budget_period = "month"

    [usage.prices.smollm2]
    prompt = 0.15          # per million prompt tokens
    completion = 0.6       # per million completion tokens

    [usage.tenant_budgets]
    acme = 5000000         # tokens per month, prompt and completion together

The same in the environment::

    TOKENWIRE_USAGE_PRICES="smollm2=prompt:0.15 completion:0.6"
    TOKENWIRE_USAGE_TENANT_BUDGETS="acme=5000000,globex=200000"
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from tokenwire.config_fields import parse_pairs, setting
from tokenwire.errors import ConfigError
from tokenwire.usage.prices import ModelPrice, parse_prices

__all__ = ["BUDGET_PERIODS", "UsageConfig"]

BUDGET_PERIODS = ("day", "month")


def _no_prices() -> Mapping[str, ModelPrice]:
    return types.MappingProxyType({})


def _no_budgets() -> Mapping[str, int]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class UsageConfig:
    """Every turn's tokens recorded per tenant, user, key and model; costs and budgets."""

    enabled: bool = setting(True, "record every turn's tokens in the conversation database")
    currency: str = setting("USD", "the currency of usage.prices and of the costs reported")
    prices: Mapping[str, ModelPrice] = field(
        default_factory=_no_prices,
        metadata={
            "help": "model -> price per million prompt and completion tokens, as "
            "[usage.prices.MODEL] tables or 'MODEL=prompt:0.15 completion:0.6,...'; "
            "models without a price cost 0"
        },
    )
    tenant_budgets: Mapping[str, int] = field(
        default_factory=_no_budgets,
        metadata={
            "help": "tenant -> tokens (prompt plus completion) its turns may use per "
            "budget_period, reserved at max_tokens and settled; tenants not named: unlimited"
        },
    )
    budget_period: str = setting(
        "day", "'day' or 'month' (UTC): how long a tenant budget lasts before it starts afresh"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "prices", types.MappingProxyType(parse_prices(self.prices)))
        given: object = self.tenant_budgets  # a string too, from the environment
        if isinstance(given, str):
            given = parse_pairs(given, "usage.tenant_budgets", "tenant=tokens,...")
        if not isinstance(given, Mapping):
            raise ConfigError(f"usage.tenant_budgets: expected a table, got {given!r}")
        budgets: dict[str, int] = {}
        for tenant, tokens in given.items():
            where = f"usage.tenant_budgets.{tenant}"
            if isinstance(tokens, bool):
                raise ConfigError(f"{where}: not an integer: {tokens!r}")
            try:
                budgets[str(tenant)] = int(tokens)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: not an integer: {tokens!r}") from None
            if budgets[str(tenant)] <= 0:
                raise ConfigError(f"{where}: must be a positive number of tokens, got {tokens!r}")
        object.__setattr__(self, "tenant_budgets", types.MappingProxyType(budgets))
        if self.budget_period not in BUDGET_PERIODS:
            raise ConfigError(
                f"usage.budget_period must be 'day' or 'month', got {self.budget_period!r}"
            )
        if not self.currency.strip():
            raise ConfigError("usage.currency must not be empty")

    def price_of(self, model: str) -> ModelPrice:
        """``model``'s price (free when it has none)."""
        return self.prices.get(model, _FREE)

    @property
    def active(self) -> bool:
        """Whether a UsagePolicy has anything to do: record turns, or enforce budgets."""
        return self.enabled or bool(self.tenant_budgets)


_FREE = ModelPrice()
