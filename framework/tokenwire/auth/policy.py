"""The turn-level half of authentication: a long-lived stream's credential, checked per turn.

A Converse stream is authenticated once, when it opens, and may live for hours.
Before each turn :class:`CredentialPolicy` checks the call's credential again: a
revoked API key (seen within ``auth.key_cache_ttl_s``) or an expired token ends
the stream's next turn with UNAUTHENTICATED.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenwire.turns.policy import OutputFilter, TurnInfo, TurnOutcome

if TYPE_CHECKING:
    from tokenwire.auth.interceptor import AuthInterceptor

__all__ = ["CredentialPolicy"]


class CredentialPolicy:
    """Re-checks the call's credential before every turn."""

    __slots__ = ("_auth",)

    def __init__(self, auth: AuthInterceptor) -> None:
        self._auth = auth

    async def before_turn(self, turn: TurnInfo) -> None:
        """Refuse the turn when the call's credential stopped being valid."""
        credential = turn.call.credential
        if credential is not None:
            await self._auth.recheck(credential)

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        """Authentication does not look at the answer."""
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        """Nothing to settle."""
        return None
