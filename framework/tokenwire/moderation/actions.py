"""What a flag does, per tenant and plan: block the text, log it only, or allow it.

A moderator says *what* a text is (a category); the tenant's policy says what
follows. ``block`` refuses the message or cuts the answer (the default for every
category); ``log`` lets the text through and records the flag (it counts against
the principal); ``allow`` lets it through and still audits it, without counting.
The most specific rule wins: an override set through ``AdminService`` for the
tenant, then ``tenant_categories[tenant]``, then ``tenant_categories["plan:PLAN"]``,
then ``categories``::

    [moderation.categories]               # every tenant
    hate = "block"
    [moderation.tenant_categories]        # per tenant, or per plan with "plan:NAME"
    acme = "violence:allow drugs:log"     # a crime-fiction publisher
    "plan:research" = "extremism:log"

Every flag, whatever its action, becomes a :class:`FlagEvent` for the
:class:`FlagSink` (the abuse monitor: counts, throttles, suspends, lists events).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from tokenwire.auth.principal import Principal
from tokenwire.errors import ConfigError

__all__ = [
    "ACTIONS",
    "ALLOW",
    "BLOCK",
    "LOG",
    "CategoryActions",
    "FlagEvent",
    "FlagSink",
    "TenantOverrides",
    "parse_actions",
    "parse_tenant_actions",
]

BLOCK: Final = "block"
LOG: Final = "log"
ALLOW: Final = "allow"
ACTIONS: Final = (BLOCK, LOG, ALLOW)


@dataclass(frozen=True, slots=True)
class FlagEvent:
    """One flagged check: who, which turn, which way, what, by whom, and what followed."""

    principal: Principal
    turn_id: str
    direction: str  # "input" (the user's message) or "output" (the answer)
    category: str
    moderator: str
    score: float
    action: str  # block, log or allow
    text: str  # the flagged text; a sink keeps it only where the tenant's policy says so
    keep_text: bool = False  # the tenant's policy keeps flagged text


@runtime_checkable
class FlagSink(Protocol):
    """Hears every flag. Called on the event loop mid-turn: it must not block or raise."""

    def flagged(self, event: FlagEvent) -> None:
        """Record ``event`` (queue any I/O; never wait here)."""
        ...


@runtime_checkable
class TenantOverrides(Protocol):
    """Per-tenant category actions set at run time (``AdminService``), read per turn."""

    def tenant_actions(self, tenant: str) -> Mapping[str, str] | None:
        """The tenant's category -> action overrides, or None; answers from memory."""
        ...

    def keeps_text(self, tenant: str) -> bool | None:
        """Whether the tenant keeps flagged text (None: as configured); from memory."""
        ...


def parse_actions(value: Mapping[str, Any] | str, where: str) -> dict[str, str]:
    """``{"hate": "log"}`` or ``"hate:log violence:allow"`` -> a checked category -> action map."""
    if isinstance(value, str):
        pairs = [part.split(":", 1) for part in value.replace(",", " ").split() if part]
        if any(len(pair) != 2 for pair in pairs):
            raise ConfigError(f"{where}: expected 'category:action ...', got {value!r}")
        value = {key: action for key, action in pairs}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table of category = action, got {value!r}")
    actions = {str(key).strip(): str(action).strip().lower() for key, action in value.items()}
    for category, action in actions.items():
        if action not in ACTIONS:
            raise ConfigError(
                f"{where}.{category}: action must be one of {', '.join(ACTIONS)}, got {action!r}"
            )
    return actions


def parse_tenant_actions(value: Mapping[str, Any] | str, where: str) -> dict[str, dict[str, str]]:
    """``{"acme": "violence:allow"}`` or ``"acme=violence:allow drugs:log, plan:pro=..."``."""
    if isinstance(value, str):
        entries = [part.split("=", 1) for part in value.split(",") if part.strip()]
        if any(len(entry) != 2 for entry in entries):
            raise ConfigError(f"{where}: expected 'tenant=category:action ...,...', got {value!r}")
        value = {key.strip(): actions for key, actions in entries}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table of tenant = actions, got {value!r}")
    return {str(key): parse_actions(actions, f"{where}.{key}") for key, actions in value.items()}


class CategoryActions:
    """Resolves the action for a principal's flag; see the module docstring."""

    def __init__(
        self,
        categories: Mapping[str, str],
        tenant_categories: Mapping[str, Mapping[str, str]],
        keep_text_tenants: frozenset[str] = frozenset(),
        overrides: TenantOverrides | None = None,
    ) -> None:
        self._global = types.MappingProxyType(dict(categories))
        self._tenants = {key: dict(actions) for key, actions in tenant_categories.items()}
        self._keep = keep_text_tenants
        self.overrides = overrides

    def action(self, principal: Principal, category: str) -> str:
        """block, log or allow: the most specific rule for ``category``."""
        if self.overrides is not None:
            override = self.overrides.tenant_actions(principal.tenant)
            if override is not None and category in override:
                return override[category]
        for key in (principal.tenant, f"plan:{principal.plan}"):
            actions = self._tenants.get(key)
            if actions is not None and category in actions:
                return actions[category]
        return self._global.get(category, BLOCK)

    def keeps_text(self, principal: Principal) -> bool:
        """Whether flagged text of this principal's tenant is kept with its events."""
        if self.overrides is not None:
            kept = self.overrides.keeps_text(principal.tenant)
            if kept is not None:
                return kept
        return principal.tenant in self._keep
