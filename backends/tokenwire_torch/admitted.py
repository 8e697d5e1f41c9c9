"""What the torch engine keeps for each admitted request, on either of its paths."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenwire.backend import FinishReason, GenerateRequest

if TYPE_CHECKING:
    from tokenwire_torch._runner import DecodeState
    from tokenwire_torch.batching import Row

__all__ = ["Admitted", "Phase"]


class Phase(enum.Enum):
    QUEUED = "queued"  # admitted, prefill not done yet
    RUNNING = "running"  # producing tokens


@dataclass(eq=False)
class Admitted:
    """One admitted request: shared by its producer and its consumer generator.

    Only the event loop thread mutates these fields; the worker thread reads
    ``cancelled`` and uses ``state`` or ``row``, which it receives as arguments.
    """

    request: GenerateRequest
    stop_token_ids: frozenset[int]
    state: DecodeState | None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pending: list[int] = field(default_factory=list)
    phase: Phase = Phase.QUEUED
    completion_tokens: int = 0
    steps: int = 0
    cancelled: bool = False
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    producer: asyncio.Future[None] | None = None
    row: Row | None = None  # its place in the batch, when the engine batches
    limit: int = 0  # most completion tokens
