"""A turn on plain types: what comes in, what goes out, and what it did so far.

The turn runner never builds protobuf messages: the service at the edge turns a
request into a :class:`TurnRequest` and hands the runner a :class:`TurnEvents`
that encodes each event as the RPC's own response message, so no layer between
the engine and gRPC copies an event twice::

    class ResponseEvents:                        # in tokenwire.services.convert
        def delta(self, text, token_count):
            return self._response(delta=Delta(text=text, token_count=token_count))
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tokenwire.backend import ChatMessage, FinishReason
from tokenwire.model.frontend import TurnParams

__all__ = [
    "Finished",
    "Started",
    "TurnEvents",
    "TurnRequest",
    "TurnState",
    "Usage",
    "new_message_id",
]

Out = TypeVar("Out", covariant=True)
# Turn and message ids name, they do not guard (the store checks who owns what):
# the random module's generator (reseeded in a forked child), not a system call per id.


def new_message_id() -> str:
    """A fresh id for an assistant message, ``msg_`` and 32 hex digits."""
    return f"msg_{random.getrandbits(128):032x}"


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """One user turn, as the client asked for it (validated by the runner)."""

    message: str
    conversation_id: str = ""  # empty: a new conversation
    params: TurnParams = field(default_factory=TurnParams)
    model: str = ""  # empty: the default model
    idempotency_key: str = ""
    # Earlier messages the client keeps itself, sent to the model instead of a stored
    # conversation's history (only without conversation_id); never stored.
    context: tuple[ChatMessage, ...] = ()


@dataclass(frozen=True, slots=True)
class Started:
    """The turn is admitted and the user's message stored."""

    turn_id: str
    conversation_id: str
    message_id: str
    model: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting of a turn."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float


@dataclass(frozen=True, slots=True)
class Finished:
    """How the turn ended."""

    turn_id: str
    finish_reason: FinishReason
    usage: Usage
    filter_category: str = ""


class TurnEvents(Protocol[Out]):
    """Encodes a turn's events as the messages its RPC sends."""

    def started(self, event: Started) -> Out:
        """TurnStarted."""
        ...

    def delta(self, text: str, token_count: int) -> Out:
        """New answer text covering ``token_count`` completion tokens."""
        ...

    def finished(self, event: Finished) -> Out:
        """TurnFinished."""
        ...


@dataclass(slots=True)
class TurnState:
    """What a running turn has done so far; read by the caller on cancel or failure."""

    received_at: float = field(default_factory=time.perf_counter)
    turn_id: str = field(default_factory=lambda: f"turn_{random.getrandbits(128):032x}")
    conversation_id: str = ""
    message_id: str = ""  # set once the user's message is stored, just before TurnStarted
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    sent: list[str] = field(default_factory=list)
    finished: bool = False  # the answer ended (engine, stop string or filter)
    final_sent: bool = False  # TurnFinished is on its way: the turn is over for the client
    reason: FinishReason = FinishReason.ERROR
    filter_category: str = ""

    def usage(self) -> Usage:
        """Token accounting so far."""
        ttft = 0.0 if self.first_token_at is None else self.first_token_at - self.received_at
        return Usage(self.prompt_tokens, self.completion_tokens, ttft * 1000)

    def finished_event(self, reason: FinishReason | None = None) -> Finished:
        """The Finished event for this turn (``reason`` overrides the recorded one)."""
        return Finished(
            self.turn_id,
            self.reason if reason is None else reason,
            self.usage(),
            self.filter_category,
        )
