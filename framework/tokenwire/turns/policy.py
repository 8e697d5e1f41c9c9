"""Turn policies: per-turn work that quotas, moderation and authentication do.

A Converse stream carries many turns, so per-turn policy cannot live at the call
boundary. The server hands the turn runner its policies explicitly (declared in
:mod:`tokenwire.pipeline`, next to the interceptor chain); a turn never runs
without them. For every turn the runner:

1. calls ``before_turn`` once the prompt is tokenized and bounded and capacity is
   reserved, before anything is stored or generated: raising a
   ``TokenwireError`` refuses the turn (a status on Complete, a ``TurnError`` on
   Converse) and nothing is stored;
2. passes the answer's text through each policy's ``output_filter`` before it is
   sent *or stored*, so what the client saw and what the store holds are equal;
   a filter that flags text ends the turn with FINISH_REASON_CONTENT_FILTER;
3. calls ``after_turn`` exactly once for every policy whose ``before_turn``
   succeeded, with the exact usage, however the turn ended (finished, cancelled,
   failed, cut by a filter, client gone), newest first.

``start`` and ``close`` (optional) open and release what a policy needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tokenwire.auth.principal import Principal
from tokenwire.backend import FinishReason
from tokenwire.context import CallState

__all__ = ["FilterResult", "OutputFilter", "TurnInfo", "TurnOutcome", "TurnPolicy"]


@dataclass(frozen=True, slots=True)
class TurnInfo:
    """A turn that passed validation, fits the model's context and holds capacity."""

    turn_id: str
    call: CallState  # the call the turn runs on: method, request id, credential
    principal: Principal
    model: str
    message: str  # the user's new message
    prompt_tokens: int  # exact: template and history included
    max_tokens: int  # resolved: the most completion tokens this turn may use

    @property
    def method(self) -> str:
        """The RPC, e.g. ``/tokenwire.v1.ChatService/Converse``."""
        return self.call.method


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    """How a turn ended, with exact usage."""

    finish_reason: FinishReason  # CANCELLED also when the client went away
    prompt_tokens: int
    completion_tokens: int  # tokens the engine generated for this turn
    error: BaseException | None = None  # the failure, for FINISH_REASON_ERROR
    time_to_first_token_s: float | None = None  # request to first text sent; None: none sent
    streaming_s: float = 0.0  # first text sent to the end of the answer
    filter_category: str = ""  # why an output filter cut the answer


@dataclass(frozen=True, slots=True)
class FilterResult:
    """Text a filter lets through, and why it stopped the answer (if it did)."""

    text: str
    flagged_category: str | None = None


@runtime_checkable
class OutputFilter(Protocol):
    """Screens one answer as it streams; it may hold text back until it can decide.

    A filter that never waits may also offer ``synchronous = True`` and a
    ``feed_now(text) -> FilterResult`` that the runner then calls instead of
    ``feed``, saving an await per message.
    """

    async def feed(self, text: str) -> FilterResult:
        """New answer text in; the text safe to send now out (possibly held back)."""
        ...

    async def flush(self) -> FilterResult:
        """The answer ended: release (or flag) whatever is still held back."""
        ...


@runtime_checkable
class TurnPolicy(Protocol):
    """Per-turn participation of a feature; see the module docstring."""

    async def before_turn(self, turn: TurnInfo) -> None:
        """Admit the turn, or raise a TokenwireError to refuse it."""
        ...

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        """A filter for this turn's answer, or None."""
        ...

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        """The turn ended; settle what ``before_turn`` reserved. Must not raise."""
        ...
