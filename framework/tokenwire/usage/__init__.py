"""Usage accounting: every turn's tokens recorded, priced, and held to tenant budgets.

* :class:`UsageConfig` (``[usage]``): prices per model, the currency, budgets;
* :class:`~tokenwire.usage.policy.UsagePolicy`: per turn, charges the tenant's
  budget before it runs and records its tokens in the conversation store after;
* :class:`~tokenwire.usage.report.UsageReport`: the recorded usage of a time range,
  grouped by tenant, user or model and priced (AdminService.GetUsage).

The policy and the report load on first use (``tokenwire.config`` imports this
package for its section, and must not pull in the turn machinery).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenwire.usage.config import BUDGET_PERIODS, UsageConfig
from tokenwire.usage.prices import ModelPrice, parse_price, parse_prices

if TYPE_CHECKING:
    from tokenwire.usage.budgets import TenantBudgets
    from tokenwire.usage.policy import UsagePolicy, build_usage_policy
    from tokenwire.usage.report import UsageReport, UsageRow

__all__ = [
    "BUDGET_PERIODS",
    "ModelPrice",
    "TenantBudgets",
    "UsageConfig",
    "UsagePolicy",
    "UsageReport",
    "UsageRow",
    "build_usage_policy",
    "parse_price",
    "parse_prices",
]

_LAZY = {
    "TenantBudgets": "tokenwire.usage.budgets",
    "UsagePolicy": "tokenwire.usage.policy",
    "build_usage_policy": "tokenwire.usage.policy",
    "UsageReport": "tokenwire.usage.report",
    "UsageRow": "tokenwire.usage.report",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
