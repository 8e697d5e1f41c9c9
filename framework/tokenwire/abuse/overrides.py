"""Per-tenant moderation policies set at run time, answered from memory.

:class:`TenantPolicies` is the :class:`~tokenwire.moderation.actions.TenantOverrides`
that moderation asks on every flag: it answers from a copy in memory, which a
background task reloads every ``refresh_s`` seconds when the store's version
changed (one round trip, the policies themselves only when they changed). A
change made through this gateway applies here at once, on the others within
``refresh_s``.

    policies = TenantPolicies(store, refresh_s=2.0)
    await policies.start()
    await policies.set("acme", TenantPolicy({"violence": "allow"}, keep_text=True))
    policies.tenant_actions("acme")        # {"violence": "allow"}
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import Mapping
from typing import Final

from tokenwire.abuse.store import AbuseStore, AbuseStoreError, TenantPolicy
from tokenwire.errors import InvalidArgumentError
from tokenwire.logs import get_logger
from tokenwire.moderation.actions import ACTIONS

__all__ = ["MAX_CATEGORY_CHARS", "TenantPolicies", "check_policy"]

MAX_CATEGORY_CHARS: Final = 64
_MAX_TENANT_CHARS: Final = 128  # as API keys bound their tenants
_MAX_CATEGORIES: Final = 256
_log = get_logger("tokenwire.abuse")


def check_policy(tenant: str, policy: TenantPolicy) -> TenantPolicy:
    """``policy`` with its actions lowercased, or InvalidArgumentError naming what is wrong:
    a missing tenant, an empty or long category, an action not block, log or allow."""
    if not tenant or len(tenant) > _MAX_TENANT_CHARS:
        raise InvalidArgumentError(f"tenant is required, at most {_MAX_TENANT_CHARS} characters")
    if len(policy.actions) > _MAX_CATEGORIES:
        raise InvalidArgumentError(f"at most {_MAX_CATEGORIES} categories per tenant")
    actions: dict[str, str] = {}
    for category, action in policy.actions.items():
        name = category.strip()
        if not name or len(name) > MAX_CATEGORY_CHARS:
            raise InvalidArgumentError(
                f"category names are 1 to {MAX_CATEGORY_CHARS} characters, got {category[:80]!r}"
            )
        normalized = action.strip().lower()
        if normalized not in ACTIONS:
            raise InvalidArgumentError(
                f"category_actions[{name!r}]: the action must be one of {', '.join(ACTIONS)}, "
                f"got {action[:32]!r}"
            )
        actions[name] = normalized
    return TenantPolicy(types.MappingProxyType(actions), policy.keep_text)


class TenantPolicies:
    """The tenant policies of ``store``, cached; see the module docstring."""

    def __init__(self, store: AbuseStore, *, refresh_s: float) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._policies: dict[str, TenantPolicy] = {}
        self._version = -1  # never loaded: the first load reads everything
        self._refresher: asyncio.Task[None] | None = None

    def tenant_actions(self, tenant: str) -> Mapping[str, str] | None:
        """The tenant's category -> action overrides, or None; from memory."""
        policy = self._policies.get(tenant)
        return policy.actions if policy is not None and policy.actions else None

    def keeps_text(self, tenant: str) -> bool | None:
        """Whether the tenant keeps flagged text (None: as configured); from memory."""
        policy = self._policies.get(tenant)
        return policy.keep_text if policy is not None else None

    async def start(self) -> None:
        """Load the policies (a store that does not answer is logged) and keep reloading."""
        try:
            await self.load()
        except AbuseStoreError as exc:
            _log.warning("loading tenant moderation policies failed", error=str(exc))
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def close(self) -> None:
        """Stop reloading."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None

    async def load(self) -> None:
        """Reload the policies if the store's version changed: one round trip."""
        version, policies = await self._store.policies(self._version)
        if policies is not None:
            self._policies = {
                tenant: check_policy(tenant, policy)
                for tenant, policy in policies.items()
                if _valid(tenant, policy)
            }
        self._version = version

    async def get(self, tenant: str) -> TenantPolicy:
        """``tenant``'s policy as the store holds it now (empty: none)."""
        await self.load()
        return self._policies.get(tenant, TenantPolicy())

    async def set(self, tenant: str, policy: TenantPolicy) -> TenantPolicy:
        """Check and store ``tenant``'s policy (empty: remove it); in force here at once."""
        checked = check_policy(tenant, policy)
        await self._store.set_policy(tenant, checked)
        # The version is left as it was: the next load reads every tenant again, so a
        # change another gateway made in between is not skipped.
        if checked.empty:
            self._policies.pop(tenant, None)
        else:
            self._policies[tenant] = checked
        return checked

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.load()
            except AbuseStoreError as exc:
                _log.warning("reloading tenant moderation policies failed", error=str(exc))
            except Exception:
                _log.exception("reloading tenant moderation policies failed")


def _valid(tenant: str, policy: TenantPolicy) -> bool:
    try:
        check_policy(tenant, policy)
    except InvalidArgumentError:
        _log.warning("ignoring an invalid stored moderation policy", tenant=tenant[:128])
        return False
    return True
