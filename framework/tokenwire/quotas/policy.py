"""The turn-level half of quotas: count each Converse turn, reserve and settle tokens.

Each turn reserves ``prompt_tokens + max_tokens`` before it runs and settles to
``prompt_tokens + completion_tokens`` when it ends, however it ends. On
``Converse`` every turn also counts one request (the stream itself is free).
Store, limits and refusals are the :class:`~tokenwire.quotas.interceptor.QuotaInterceptor`'s.
"""

from __future__ import annotations

from tokenwire.quotas.interceptor import CONVERSE_METHOD, QuotaInterceptor
from tokenwire.quotas.store import Reservation
from tokenwire.turns.policy import OutputFilter, TurnInfo, TurnOutcome

__all__ = ["QuotaPolicy"]


class QuotaPolicy:
    """Per-turn quotas, over the quota interceptor's store and limits."""

    def __init__(self, quotas: QuotaInterceptor) -> None:
        self.quotas = quotas
        self._reservations: dict[str, Reservation] = {}

    async def start(self) -> None:
        """Connect the shared store (a no-op when the chain started it already)."""
        await self.quotas.start()

    async def close(self) -> None:
        """Close the shared store."""
        await self.quotas.close()

    async def before_turn(self, turn: TurnInfo) -> None:
        """Count the turn (on Converse) and reserve its most tokens, or refuse it."""
        if not self.quotas.config.enabled:
            return
        limits = self.quotas.limits_for(turn.principal)
        if limits.requests and turn.method == CONVERSE_METHOD:
            await self.quotas.consume(limits)
        if limits.tokens:
            reservation = await self.quotas.reserve(limits, turn.prompt_tokens + turn.max_tokens)
            if reservation is not None:
                self._reservations[turn.turn_id] = reservation

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        """Quotas do not look at the answer's text."""
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        """Settle the reservation to the tokens the turn really used."""
        reservation = self._reservations.pop(turn.turn_id, None)
        if reservation is not None:
            await self.quotas.settle(reservation, outcome.prompt_tokens + outcome.completion_tokens)
