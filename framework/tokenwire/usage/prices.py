"""Model prices: what a million prompt tokens and a million completion tokens cost.

Prices are exact decimals (a TOML ``0.15`` is read as the decimal 0.15, not the
nearest binary float), so costs summed over millions of turns stay exact until
they are rounded once, to micro-units, at the end.

    [usage.prices.smollm2]
    prompt = 0.15
    completion = 0.6

In the environment (and anywhere a string is given), a price is written
``model=prompt:0.15 completion:0.6``, models separated by commas::

    TOKENWIRE_USAGE_PRICES="smollm2=prompt:0.15 completion:0.6,big=prompt:3 completion:15"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from tokenwire.config_fields import parse_pairs
from tokenwire.errors import ConfigError

__all__ = ["ModelPrice", "parse_price", "parse_prices"]

_FIELDS = ("prompt", "completion")
_ITEM = re.compile(r"[\s;]+")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's price per million tokens, in the configured currency."""

    prompt: Decimal = Decimal(0)
    completion: Decimal = Decimal(0)

    def micros(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """The exact cost of these tokens in millionths of the currency unit.

        A price per million tokens is exactly a price in micro-units per token.
        """
        return prompt_tokens * self.prompt + completion_tokens * self.completion


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: not a number: {value!r}")
    try:
        # str() first: a float from TOML becomes the decimal it was written as.
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ConfigError(f"{where}: not a number: {value!r}") from None
    if not number.is_finite() or number < 0:
        raise ConfigError(f"{where}: must be a finite number >= 0, got {value!r}")
    return number


def parse_price(value: ModelPrice | Mapping[str, Any] | str, where: str = "price") -> ModelPrice:
    """A price from a TOML table, a mapping, or the string ``prompt:0.15 completion:0.6``."""
    if isinstance(value, ModelPrice):
        return value
    if isinstance(value, str):
        items: dict[str, str] = {}
        for item in _ITEM.split(value.strip()):
            if not item:
                continue
            name, sep, number = item.partition(":")
            if not sep:
                raise ConfigError(
                    f"{where}: expected 'prompt:NUMBER completion:NUMBER', got {item!r}"
                )
            items[name.strip()] = number
        value = items
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table with prompt and completion, got {value!r}")
    prices: dict[str, Decimal] = {}
    for key, number in value.items():
        if key not in _FIELDS:
            raise ConfigError(f"{where}: unknown price {key!r}; known: {', '.join(_FIELDS)}")
        prices[str(key)] = _decimal(number, f"{where}.{key}")
    return ModelPrice(**prices)


def parse_prices(
    value: Mapping[str, Any] | str, where: str = "usage.prices"
) -> dict[str, ModelPrice]:
    """Prices by model from a TOML table of tables, or ``model=prompt:1 completion:2,...``."""
    if isinstance(value, str):
        value = parse_pairs(value, where, "model=prompt:0.15 completion:0.6,...")
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table of prices, got {value!r}")
    return {str(model): parse_price(spec, f"{where}.{model}") for model, spec in value.items()}
