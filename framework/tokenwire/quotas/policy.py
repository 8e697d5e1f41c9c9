"""The turn-level half of quotas: admit each turn in one store call, settle it once.

Each turn reserves ``prompt_tokens + max_tokens`` before it runs and settles to
``prompt_tokens + completion_tokens`` when it ends, however it ends. On
``Converse`` every turn also counts one request (the stream itself is free and
holds its slot from the interceptor). A ``Complete`` call is one turn: its stream
slot and its request are taken here too, with the tokens, in one store call (one
Redis round trip), and given back with the settlement when the turn ends, sent
with the store's next call or within milliseconds. Store, limits and refusals
are the :class:`~tokenwire.quotas.interceptor.QuotaInterceptor`'s.
"""

from __future__ import annotations

from tokenwire.quotas.interceptor import (
    CALL_TURN_METHODS,
    SLOT_PER_TURN_METHODS,
    TURN_STREAM_METHODS,
    QuotaInterceptor,
)
from tokenwire.quotas.store import Admission
from tokenwire.turns.policy import OutputFilter, TurnInfo, TurnOutcome

__all__ = ["QuotaPolicy"]


class QuotaPolicy:
    """Per-turn quotas, over the quota interceptor's store and limits."""

    def __init__(self, quotas: QuotaInterceptor) -> None:
        self.quotas = quotas
        quotas.turns_admit_calls = True  # Complete's and ModelInfer's slot and request: here
        self._admitted: dict[str, Admission] = {}

    async def start(self) -> None:
        """Connect the shared store (a no-op when the chain started it already)."""
        await self.quotas.start()

    async def close(self) -> None:
        """Close the shared store."""
        await self.quotas.close()

    async def before_turn(self, turn: TurnInfo) -> None:
        """Take the turn's slot and request (Complete, ModelInfer; a turn of
        ModelStreamInfer), request (a Converse turn) and most tokens in one store call,
        or refuse it."""
        if not self.quotas.config.enabled:
            return
        limits = self.quotas.limits_for(turn.principal)
        if limits.unlimited:
            return
        whole_call = turn.method in CALL_TURN_METHODS
        admission = await self.quotas.admit(
            limits,
            turn.prompt_tokens + turn.max_tokens,
            slots=whole_call or turn.method in SLOT_PER_TURN_METHODS,
            requests=whole_call or turn.method in TURN_STREAM_METHODS,
        )
        if admission is not None and (admission.lease or admission.reservation):
            self._admitted[turn.turn_id] = admission

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        """Quotas do not look at the answer's text."""
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        """Settle the reservation to the tokens the turn really used; free its slot."""
        admission = self._admitted.pop(turn.turn_id, None)
        if admission is not None:
            self.quotas.store.finish(
                admission.lease,
                admission.reservation,
                outcome.prompt_tokens + outcome.completion_tokens,
            )
