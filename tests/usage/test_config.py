"""The [usage] section: prices and budgets from TOML and from the environment; pricing."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from tokenwire.config import load_config
from tokenwire.errors import ConfigError
from tokenwire.stores import UsageTotal
from tokenwire.usage import ModelPrice, UsageConfig
from tokenwire.usage.report import UsageReport, UsageRow


def test_prices_and_budgets_from_toml_tables(tmp_path: Path) -> None:
    """[usage.prices.MODEL] and [usage.tenant_budgets] tables, prices as exact decimals."""
    path = tmp_path / "tokenwire.toml"
    path.write_text(
        '[usage]\ncurrency = "EUR"\nbudget_period = "month"\n'
        "[usage.prices.smollm2]\nprompt = 0.15\ncompletion = 0.6\n"
        '[usage.prices."org/big-model"]\nprompt = 3\n'
        "[usage.tenant_budgets]\nacme = 5000000\n"
    )

    usage = load_config(path, env={}).usage

    assert {
        "smollm2": ModelPrice(Decimal("0.15"), Decimal("0.6")),
        "org/big-model": ModelPrice(Decimal(3), Decimal(0)),
    } == dict(usage.prices)
    assert ({"acme": 5_000_000}, "month", "EUR") == (
        dict(usage.tenant_budgets), usage.budget_period, usage.currency,
    )  # fmt: skip


def test_prices_and_budgets_from_environment_strings() -> None:
    """TOKENWIRE_USAGE_PRICES and TOKENWIRE_USAGE_TENANT_BUDGETS take the string forms."""
    env = {
        "TOKENWIRE_USAGE_PRICES": "smollm2=prompt:0.15 completion:0.6, big=completion:15",
        "TOKENWIRE_USAGE_TENANT_BUDGETS": "acme=1000,globex=20",
    }

    usage = load_config(None, env=env).usage

    assert {
        "smollm2": ModelPrice(Decimal("0.15"), Decimal("0.6")),
        "big": ModelPrice(Decimal(0), Decimal(15)),
    } == dict(usage.prices)
    assert {"acme": 1000, "globex": 20} == dict(usage.tenant_budgets)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prices": "m=prompt:-1"}, r"usage\.prices\.m\.prompt: must be a finite number >= 0"),
        ({"prices": "m=input:1"}, r"unknown price 'input'"),
        ({"prices": "m=prompt:cheap"}, r"not a number"),
        ({"tenant_budgets": "acme=0"}, r"usage\.tenant_budgets\.acme: must be a positive"),
        ({"tenant_budgets": "acme=lots"}, r"not an integer"),
        ({"budget_period": "week"}, r"budget_period must be 'day' or 'month'"),
    ],
)
def test_bad_settings_are_config_errors(fields: dict[str, str], message: str) -> None:
    """Negative, unknown or non-numeric prices, empty budgets and unknown periods are refused."""
    with pytest.raises(ConfigError, match=message):
        UsageConfig(**fields)  # type: ignore[arg-type]


class _Totals:
    """A store that answers usage_totals with fixed totals."""

    def __init__(self, *totals: UsageTotal) -> None:
        self.totals = list(totals)

    async def usage_totals(
        self, *, start: float, end: float, group_by: str, tenant: str = ""
    ) -> list[UsageTotal]:
        return self.totals


async def test_costs_are_summed_exactly_and_rounded_once() -> None:
    """Each model at its own price, the group's sum exact, micro-units rounded half to
    even once; a model without a price costs nothing."""
    config = UsageConfig(prices="a=prompt:0.15 completion:0.6,b=prompt:0.5")  # type: ignore[arg-type]
    store = _Totals(
        UsageTotal("acme", "a", 2, 11, 3),  # 1.65 + 1.8 = 3.45 micro
        UsageTotal("acme", "b", 1, 3, 100),  # 1.5 micro
        UsageTotal("acme", "free", 1, 1000, 1000),
        UsageTotal("globex", "b", 1, 1, 0),  # 0.5 micro: rounds to 0 (half to even)
    )

    report = await UsageReport(store, config).usage(start=0, end=1, group_by="tenant")  # type: ignore[arg-type]

    assert [
        UsageRow("acme", 4, 1014, 1103, 5, Decimal("0.00000495")),
        UsageRow("globex", 1, 1, 0, 0, Decimal("5E-7")),
    ] == report
    assert 4.95e-06 == report[0].cost_float
