"""Per-call state, passed through a contextvar (each gRPC call runs in its own task).

The errors interceptor binds a :class:`CallState` for every call; authentication
fills in who is calling. Reading it outside a bound call is a bug of the server's
assembly, so :func:`current_call` raises instead of inventing a caller::

    from tokenwire.context import current_call
    current_call().principal        # None until authentication ran
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenwire.errors import InternalError, UnauthenticatedError

if TYPE_CHECKING:
    from tokenwire.auth.principal import Principal

__all__ = [
    "CallState",
    "Credential",
    "bind_call",
    "current_call",
    "current_principal",
    "reset_call",
]


@dataclass(frozen=True, slots=True)
class Credential:
    """What a call authenticated with, so a long-lived stream can check it again per turn.

    ``kind`` is "api_key" (``key_hash`` set), "jwt" (``token`` set) or "mtls".
    Kept in memory for the call only; never logged.
    """

    kind: str
    key_hash: bytes = b""
    token: str = ""


@dataclass(slots=True)
class CallState:
    """What interceptors learn about a call, for the handler and the next interceptors."""

    request_id: str
    method: str
    principal: Principal | None = None  # None: no authentication ran (the turn is refused)
    credential: Credential | None = None


_CALL: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
    "tokenwire_call", default=None
)


def current_call() -> CallState:
    """The state of the call being served.

    Raises :class:`InternalError` outside a bound call: a server whose chain does not
    start with the errors interceptor must not serve anything.
    """
    state = _CALL.get()
    if state is None:
        raise InternalError("no call state is bound: the errors interceptor did not run")
    return state


def current_principal() -> Principal:
    """Who is calling; raises UNAUTHENTICATED when no authentication ran for this call."""
    principal = current_call().principal
    if principal is None:
        raise UnauthenticatedError("the call was not authenticated")
    return principal


def bind_call(state: CallState) -> contextvars.Token[CallState | None]:
    """Make ``state`` the current call's state; returns a token for :func:`reset_call`."""
    return _CALL.set(state)


def reset_call(token: contextvars.Token[CallState | None]) -> None:
    """Undo :func:`bind_call`."""
    _CALL.reset(token)
