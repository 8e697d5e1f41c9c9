"""Tenant token budgets: tokens per tenant per UTC day or month, in the quota store.

A turn charges ``prompt_tokens + max_tokens`` to its tenant's counter for the
current period before it runs, and is settled to the tokens it really used when
it ends. The counter lives in the quota store's backend
(:class:`~tokenwire.quotas.BudgetStore`): in memory for one gateway, in Redis for
a fleet, one atomic script and one round trip per charge, settlements sent with
the next call. The period is part of the counter's key, so a new period starts
at 0, and the counter expires when its period is over.

Periods follow the gateway's clock: gateways of a fleet keep their clocks in
step (NTP), or a turn in the seconds around midnight may count toward the
neighbouring period.

    budgets = TenantBudgets(config.usage, MemoryQuotaStore())
    charge = await budgets.charge(principal.tenant, 512)   # None: no budget for the tenant
    budgets.settle(charge, 230)
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Final

from google.rpc import error_details_pb2

from tokenwire.errors import ResourceExhaustedError, UnavailableError
from tokenwire.logs import get_logger
from tokenwire.quotas.store import (
    Budget,
    BudgetCharge,
    BudgetStore,
    QuotaStoreError,
    retry_delay,
    tenant_tag,
)
from tokenwire.usage.config import UsageConfig

__all__ = ["TenantBudgets", "current_period"]

_log = get_logger("tokenwire.usage")
_STORE_RETRY_S: Final = 1.0
# A period's counter outlives its end by this much: a gateway whose clock runs
# behind still finds it, and late settlements still land.
_EXPIRY_GRACE_S: Final = 3600.0


def current_period(period: str, now: float) -> tuple[str, float]:
    """The UTC ``period`` ("day" or "month") holding unix time ``now``: its name
    (``2025-06-01`` or ``2025-06``) and its end, in unix seconds."""
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "day":
        start = dt.datetime(moment.year, moment.month, moment.day, tzinfo=dt.UTC)
        return start.strftime("%Y-%m-%d"), (start + dt.timedelta(days=1)).timestamp()
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    end = dt.datetime(year, month, 1, tzinfo=dt.UTC)
    return moment.strftime("%Y-%m"), end.timestamp()


class TenantBudgets:
    """Charges and settles turns against ``config.tenant_budgets`` in ``store``.

    ``fail_open``: when the store cannot answer, admit turns uncounted (true) or
    refuse them UNAVAILABLE (false). ``clock`` gives unix seconds.
    """

    def __init__(
        self,
        config: UsageConfig,
        store: BudgetStore,
        *,
        fail_open: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self._fail_open = fail_open
        self._clock = clock
        self._quota = f"tokens_per_{config.budget_period}"

    def limit_of(self, tenant: str) -> int:
        """The tenant's tokens per period; 0: no budget."""
        return self.config.tenant_budgets.get(tenant, 0)

    def budget_of(self, tenant: str) -> Budget | None:
        """The tenant's budget for the current period, or None when it has none."""
        limit = self.limit_of(tenant)
        if not limit:
            return None
        name, end = current_period(self.config.budget_period, self._clock())
        key = f"{tenant_tag(tenant)}:budget:{self.config.budget_period}:{name}"
        return Budget(key, limit, end + _EXPIRY_GRACE_S)

    async def charge(self, tenant: str, amount: int) -> BudgetCharge | None:
        """Charge ``amount`` tokens to the tenant, or raise RESOURCE_EXHAUSTED (with the
        delay until the period ends, and a QuotaFailure naming the tenant's budget).
        None when the tenant has no budget (or the store is down and ``fail_open``)."""
        budget = self.budget_of(tenant)
        if budget is None:
            return None
        try:
            used, charge = await self.store.charge_budget(budget, amount)
        except QuotaStoreError as exc:
            if self._fail_open:
                _log.warning("budget store unreachable; admitting uncounted", error=str(exc))
                return None
            raise UnavailableError(
                "token budgets cannot be checked right now; retry shortly",
                retry_after_s=_STORE_RETRY_S,
            ) from exc
        if charge is None:
            raise self._refusal(tenant, budget, used, amount)
        return charge

    def settle(self, charge: BudgetCharge, actual: int) -> None:
        """Correct ``charge`` to the ``actual`` tokens used; never raises, never waits."""
        try:
            self.store.settle_budget(charge, actual)
        except Exception:
            _log.exception("settling a token budget charge failed; it stays charged in full")

    def _refusal(
        self, tenant: str, budget: Budget, used: int, amount: int
    ) -> ResourceExhaustedError:
        failure = error_details_pb2.QuotaFailure()
        failure.violations.add(
            subject=f"tenant:{tenant}",
            description=self._quota,
            quota_id=self._quota,
            quota_value=budget.limit,
        )
        period = self.config.budget_period
        if amount > budget.limit:  # it fits in no period: waiting would not help
            return ResourceExhaustedError(
                f"this turn needs {amount} tokens (prompt + max_tokens), more than the whole "
                f"{self._quota} budget of tenant:{tenant} ({budget.limit}); lower max_tokens",
                details=[failure],
            )
        _, end = current_period(period, self._clock())
        delay = retry_delay(end - self._clock())
        return ResourceExhaustedError(
            f"{self._quota} budget of tenant:{tenant} exhausted ({used} of {budget.limit} "
            f"tokens used this {period}, this turn needs up to {amount}); "
            f"retry in {delay:g}s, when the {period} ends (UTC)",
            retry_after_s=delay,
            details=[failure],
        )
