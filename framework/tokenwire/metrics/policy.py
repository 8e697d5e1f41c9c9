"""Per-turn metrics: a turn policy that only watches, placed first so it sees every turn
a policy admitted or refused."""

from __future__ import annotations

import time

from tokenwire.backend import FinishReason
from tokenwire.errors import ContentFilteredError, ResourceExhaustedError, TokenwireError
from tokenwire.metrics.registry import Metrics
from tokenwire.turns.policy import OutputFilter, TurnInfo, TurnOutcome

__all__ = ["MetricsPolicy", "ending_of", "quotas_of"]

# Statuses that refuse a turn before it starts (an engine failure is an error).
_REFUSALS = frozenset(
    {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED",
     "FAILED_PRECONDITION"}
)  # fmt: skip


def ending_of(outcome: TurnOutcome) -> str:
    """How a turn ended, as the ``ending`` label says it."""
    error = outcome.error
    if (
        outcome.finish_reason is FinishReason.ERROR
        and isinstance(error, TokenwireError)
        and not outcome.completion_tokens
        and outcome.time_to_first_token_s is None
        and error.code.name in _REFUSALS
    ):
        return "refused"
    return outcome.finish_reason.value


def quotas_of(error: BaseException) -> list[str]:
    """The quotas a refusal names (google.rpc.QuotaFailure), or none."""
    if not isinstance(error, ResourceExhaustedError):
        return []
    return [
        v.quota_id or v.description
        for detail in error.details
        for v in getattr(detail, "violations", ())
        if v.quota_id or v.description
    ] or ["capacity"]


class MetricsPolicy:
    """Counts turns, tokens and timings; never refuses and never filters."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._started: dict[str, float] = {}

    async def before_turn(self, turn: TurnInfo) -> None:
        self._started[turn.turn_id] = time.perf_counter()

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        started = self._started.pop(turn.turn_id, None)
        m, model = self.metrics, turn.model
        tenant = m.tenant(turn.principal.tenant)
        ending = ending_of(outcome)
        m.turns.labels(model, tenant, ending).inc()
        if outcome.prompt_tokens:
            m.prompt_tokens.labels(model, tenant).inc(outcome.prompt_tokens)
        if outcome.completion_tokens:
            m.completion_tokens.labels(model, tenant).inc(outcome.completion_tokens)
        if outcome.time_to_first_token_s is not None:
            m.ttft.labels(model).observe(outcome.time_to_first_token_s)
            if outcome.completion_tokens > 1:
                tpot = outcome.streaming_s / (outcome.completion_tokens - 1)
                m.tpot.labels(model).observe(tpot)
        if started is not None:
            m.duration.labels(model, ending).observe(time.perf_counter() - started)
        if outcome.filter_category:
            m.moderation_blocks.labels(outcome.filter_category, "output").inc()
        error = outcome.error
        if isinstance(error, ContentFilteredError):
            m.moderation_blocks.labels(error.category, "input").inc()
        elif error is not None and ending == "refused":
            for quota in quotas_of(error):
                m.quota_refusals.labels(tenant, quota).inc()
