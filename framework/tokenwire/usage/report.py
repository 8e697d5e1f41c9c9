"""Usage reports: the store's totals of a time range, grouped and priced.

The store sums tokens per group and model; each model's tokens are priced at
its configured price (exact decimals), the group's costs are added up exactly,
and only the total is rounded, once, to micro-units. Costs use the prices
configured now, for the whole range: a price change re-prices past usage.

    report = UsageReport(store, config.usage)
    rows = await report.usage(start=day_start, end=time.time(), group_by="tenant")
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING

from tokenwire.usage.config import UsageConfig

if TYPE_CHECKING:
    from tokenwire.stores.conversations import ConversationStore

__all__ = ["UsageReport", "UsageRow"]

_MICROS = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group's turns, tokens and cost (in ``UsageReport.currency``)."""

    key: str
    turns: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int  # millionths of the currency unit, rounded half to even
    cost: Decimal  # exact

    @property
    def cost_float(self) -> float:
        """The cost as a float (for the wire)."""
        return float(self.cost)


class UsageReport:
    """Reads usage from ``store`` and prices it with ``config.prices``."""

    def __init__(self, store: ConversationStore, config: UsageConfig) -> None:
        self.store = store
        self.config = config

    @property
    def currency(self) -> str:
        """The currency of every cost."""
        return self.config.currency

    async def usage(
        self, *, start: float, end: float, group_by: str, tenant: str = ""
    ) -> list[UsageRow]:
        """Usage recorded at ``start <= t < end`` (unix seconds), one row per group
        (``"tenant"``, ``"user"`` or ``"model"``), sorted by key; InvalidArgumentError
        for an empty range or an unknown grouping."""
        totals = await self.store.usage_totals(
            start=start, end=end, group_by=group_by, tenant=tenant
        )
        groups: dict[str, tuple[int, int, int, Decimal]] = {}
        for total in totals:
            turns, prompt, completion, micros = groups.get(total.key, (0, 0, 0, Decimal(0)))
            price = self.config.price_of(total.model)
            groups[total.key] = (
                turns + total.turns,
                prompt + total.prompt_tokens,
                completion + total.completion_tokens,
                micros + price.micros(total.prompt_tokens, total.completion_tokens),
            )
        return [
            UsageRow(
                key,
                turns,
                prompt,
                completion,
                int(micros.quantize(Decimal(1), rounding=ROUND_HALF_EVEN)),
                micros / _MICROS,
            )
            for key, (turns, prompt, completion, micros) in sorted(groups.items())
        ]
