"""Turn hooks: how interceptors take part in each chat turn, on every RPC shape.

A Converse stream carries many turns, so per-turn policy (token quotas, input and
output moderation) cannot live at the call boundary alone. An interceptor that
cares registers a :class:`TurnHook` on the call's state
(``current_call().turn_hooks``); the turn runner then, for every turn:

1. calls ``before_turn`` once the prompt is tokenized and bounded, before
   anything is stored or generated — raising a ``TokenwireError`` refuses the
   turn (a status on Complete, a ``TurnError`` on Converse);
2. passes the answer's text through each hook's ``output_filter`` before it is
   sent *or stored*, so what the client saw and what the store holds are equal;
   a filter that flags text ends the turn with FINISH_REASON_CONTENT_FILTER;
3. calls ``after_turn`` exactly once for every hook whose ``before_turn``
   succeeded, with the exact usage, however the turn ended (finished, cancelled,
   failed, cut by a filter, client gone).

Hooks run in chain order (outermost interceptor first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tokenwire.backend import FinishReason
from tokenwire.context import Principal

__all__ = ["FilterResult", "OutputFilter", "TurnHook", "TurnInfo", "TurnOutcome"]


@dataclass(frozen=True, slots=True)
class TurnInfo:
    """A turn that passed validation and fits the model's context."""

    turn_id: str
    method: str  # the RPC, e.g. "/tokenwire.v1.ChatService/Converse"
    principal: Principal
    model: str
    message: str  # the user's new message
    prompt_tokens: int  # exact: template and history included
    max_tokens: int  # resolved: the most completion tokens this turn may use


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    """How a turn ended, with exact usage."""

    finish_reason: FinishReason  # CANCELLED also when the client went away
    prompt_tokens: int
    completion_tokens: int  # tokens the engine generated for this turn
    error: BaseException | None = None  # the failure, for FINISH_REASON_ERROR


@dataclass(frozen=True, slots=True)
class FilterResult:
    """Text a filter lets through, and why it stopped the answer (if it did)."""

    text: str
    flagged_category: str | None = None


@runtime_checkable
class OutputFilter(Protocol):
    """Screens one answer as it streams; it may hold text back until it can decide."""

    async def feed(self, text: str) -> FilterResult:
        """New answer text in; the text safe to send now out (possibly held back)."""
        ...

    async def flush(self) -> FilterResult:
        """The answer ended: release (or flag) whatever is still held back."""
        ...


@runtime_checkable
class TurnHook(Protocol):
    """Per-turn participation of an interceptor; see the module docstring."""

    async def before_turn(self, turn: TurnInfo) -> None:
        """Admit the turn, or raise a TokenwireError to refuse it."""
        ...

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        """A filter for this turn's answer, or None."""
        ...

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        """The turn ended; settle what ``before_turn`` reserved. Must not raise."""
        ...
