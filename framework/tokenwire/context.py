"""Per-call state, passed through contextvars (each gRPC call runs in its own task).

from tokenwire.context import current_call
current_call().principal.user
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenwire.hooks import TurnHook

__all__ = ["ANONYMOUS", "CallState", "Principal", "bind_call", "current_call", "reset_call"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: set by authentication, read by quotas, stores and logs."""

    tenant: str
    user: str
    roles: frozenset[str] = frozenset()
    plan: str = "default"

    @property
    def owner(self) -> str:
        """The key that owns this caller's conversations."""
        return f"{self.tenant}/{self.user}"


ANONYMOUS = Principal(tenant="default", user="anonymous")


@dataclass(slots=True)
class CallState:
    """What interceptors learn about a call, for the handler and the next interceptors."""

    request_id: str
    method: str
    principal: Principal = ANONYMOUS
    turn_hooks: list[TurnHook] = field(default_factory=list)  # see tokenwire.hooks
    extra: dict[str, object] = field(default_factory=dict)


_CALL: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
    "tokenwire_call", default=None
)


def current_call() -> CallState:
    """The state of the call being served; a detached default outside any call."""
    state = _CALL.get()
    return state if state is not None else CallState(request_id="", method="")


def bind_call(state: CallState) -> contextvars.Token[CallState | None]:
    """Make ``state`` the current call's state; returns a token for :func:`reset_call`."""
    return _CALL.set(state)


def reset_call(token: contextvars.Token[CallState | None]) -> None:
    """Undo :func:`bind_call`."""
    _CALL.reset(token)
