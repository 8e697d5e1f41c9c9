"""The turn-level half of usage accounting: charge the tenant's budget, record the turn.

:class:`UsagePolicy` is a :class:`~tokenwire.turns.policy.TurnPolicy`:

* ``before_turn`` charges ``prompt_tokens + max_tokens`` to the tenant's budget
  for the current period (when it has one), or refuses the turn with
  RESOURCE_EXHAUSTED before anything is stored (see :mod:`tokenwire.usage.budgets`);
* ``after_turn`` settles the charge to the tokens really used and records the
  turn's usage row in the conversation store, for every turn that reached the
  engine (finished, cancelled, cut by a filter, failed mid-answer). A turn that
  never did (refused by a later policy, a replayed idempotent retry) used no
  tokens and records nothing. A failed write is logged; it never fails the turn.

Why a policy and not the store's ``finish_turn``: the runner already hands every
policy the exact usage once per turn, however it ended, and the policy knows
what ``finish_turn`` does not (tenant and user apart, the API key); a turn whose
answer could not be stored (its gateway declared dead) still used its tokens.
The row is written before the client sees TurnFinished, so usage read after a
turn's end includes it.

    usage = UsagePolicy(config.usage, store, budgets=TenantBudgets(config.usage, quota_store))
    policies = [CredentialPolicy(auth), QuotaPolicy(quotas), usage, moderation]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenwire.errors import ConfigError
from tokenwire.logs import get_logger
from tokenwire.quotas.config import QuotaConfig
from tokenwire.quotas.store import BudgetCharge, BudgetStore, QuotaStoreError
from tokenwire.stores.usage import UsageRecord
from tokenwire.turns.policy import OutputFilter, TurnInfo, TurnOutcome
from tokenwire.usage.budgets import TenantBudgets
from tokenwire.usage.config import UsageConfig

if TYPE_CHECKING:
    from tokenwire.auth.keys import KeyStore
    from tokenwire.stores.conversations import ConversationStore

__all__ = ["UsagePolicy", "build_usage_policy"]

_log = get_logger("tokenwire.usage")


class UsagePolicy:
    """Per-turn budgets and usage records; see the module docstring.

    ``store`` receives the usage rows (when ``config.enabled``; None: budgets only,
    as for a pipeline built without its server's store); ``budgets`` enforces
    ``config.tenant_budgets`` (None: no budgets). ``keys`` names the API key a call
    authenticated with (its id goes in the row); without it the id is left empty.
    ``owns_budget_store``: :meth:`start` and :meth:`close` open and close the budgets'
    store (false when it is the quota interceptor's, which does both). ``clock``
    gives unix seconds.
    """

    def __init__(
        self,
        config: UsageConfig,
        store: ConversationStore | None,
        *,
        budgets: TenantBudgets | None = None,
        keys: KeyStore | None = None,
        owns_budget_store: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.budgets = budgets
        self._keys = keys
        self._owns_budget_store = owns_budget_store and budgets is not None
        self._clock = clock
        self._charges: dict[str, BudgetCharge] = {}

    async def start(self) -> None:
        """Connect the budgets' store when this policy owns it."""
        if not self._owns_budget_store or self.budgets is None:
            return
        try:
            await self.budgets.store.start()
        except QuotaStoreError as exc:
            raise ConfigError(
                f"the token budget store is unreachable at start-up ({exc}); "
                "fix quotas.redis_url, or set quotas.fail_open = true to serve regardless"
            ) from exc

    async def close(self) -> None:
        """Close the budgets' store when this policy owns it."""
        if self._owns_budget_store and self.budgets is not None:
            await self.budgets.store.close()

    async def before_turn(self, turn: TurnInfo) -> None:
        """Charge the turn's most tokens to its tenant's budget, or refuse it."""
        if self.budgets is None:
            return
        charge = await self.budgets.charge(
            turn.principal.tenant, turn.prompt_tokens + turn.max_tokens
        )
        if charge is not None:
            self._charges[turn.turn_id] = charge

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        """Usage does not look at the answer's text."""
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        """Settle the budget to the tokens used; record the turn if it reached the engine."""
        used = outcome.prompt_tokens + outcome.completion_tokens
        charge = self._charges.pop(turn.turn_id, None)
        if charge is not None and self.budgets is not None:
            self.budgets.settle(charge, used)
        if not self.config.enabled or self.store is None or used == 0:
            return  # a turn the engine never got used no tokens: nothing to record
        try:
            record = UsageRecord(
                turn_id=turn.turn_id,
                tenant=turn.principal.tenant,
                user=turn.principal.user,
                api_key_id=await self._key_id(turn),
                model=turn.model,
                finish_reason=outcome.finish_reason.value,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                recorded_at=self._clock(),
            )
            await self.store.record_usage(record)
        except Exception:
            _log.exception(
                "recording a turn's usage failed",
                turn_id=turn.turn_id,
                tenant=turn.principal.tenant,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
            )

    async def _key_id(self, turn: TurnInfo) -> str:
        credential = turn.call.credential
        if self._keys is None or credential is None or credential.kind != "api_key":
            return ""
        # The auth interceptor's caching store answers from memory: the credential
        # policy looked the same key up before this turn.
        key = await self._keys.lookup(credential.key_hash)
        return key.id if key is not None else ""


def build_usage_policy(
    config: UsageConfig,
    store: ConversationStore | None,
    *,
    quotas: QuotaConfig,
    quota_store: object | None = None,
    keys: KeyStore | None = None,
) -> UsagePolicy | None:
    """The UsagePolicy ``config`` asks for, or None when it asks for nothing.

    Budgets live in ``quota_store`` (the quota interceptor's, shared with the quotas
    and started and closed by them) or, without one, in a store of their own built
    from ``quotas`` (memory, or Redis at ``quotas.redis_url``), which the policy
    opens and closes. ``quotas.fail_open`` applies to budgets too.
    """
    if not config.active:
        return None
    budgets: TenantBudgets | None = None
    owns = False
    if config.tenant_budgets:
        if quota_store is None:
            from tokenwire.quotas import create_quota_store

            quota_store, owns = create_quota_store(quotas), True
        if not isinstance(quota_store, BudgetStore):
            raise ConfigError(
                f"usage.tenant_budgets need a quota store that keeps budgets; "
                f"{type(quota_store).__name__} does not (MemoryQuotaStore and "
                "RedisQuotaStore do)"
            )
        budgets = TenantBudgets(config, quota_store, fail_open=quotas.fail_open)
    return UsagePolicy(config, store, budgets=budgets, keys=keys, owns_budget_store=owns)
