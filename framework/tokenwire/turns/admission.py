"""Admission of a turn: its fields within the limits, and a place at the model.

Both happen before anything is stored or sent, so a refused turn leaves no trace:

    validate_request(request, limits)   # InvalidArgumentError naming the field
    capacity.reserve()                  # ResourceExhaustedError with a retry delay
"""

from __future__ import annotations

import math

from tokenwire.config import LimitsConfig
from tokenwire.errors import InvalidArgumentError, ResourceExhaustedError
from tokenwire.model.frontend import TurnParams
from tokenwire.turns.events import TurnRequest

__all__ = ["Capacity", "validate_context", "validate_params", "validate_request"]

_RETRY_AFTER_S = 1.0
_CONTEXT_ROLES = frozenset(("system", "user", "assistant"))


def validate_params(params: TurnParams, limits: LimitsConfig) -> None:
    """Check sampling parameters; raises InvalidArgumentError naming the field."""
    if not (math.isfinite(params.temperature) and 0.0 <= params.temperature <= 2.0):
        raise InvalidArgumentError(f"temperature must be in [0, 2], got {params.temperature}")
    if not (math.isfinite(params.top_p) and 0.0 <= params.top_p <= 1.0):
        raise InvalidArgumentError(f"top_p must be in [0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidArgumentError(f"top_k must be >= 0, got {params.top_k}")
    if params.max_tokens < 0:
        raise InvalidArgumentError(f"max_tokens must be >= 0, got {params.max_tokens}")
    if len(params.stop) > limits.max_stop_strings:
        raise InvalidArgumentError(
            f"at most {limits.max_stop_strings} stop strings are allowed, got {len(params.stop)}"
        )
    for stop in params.stop:
        size = len(stop.encode())
        if not stop or size > limits.max_stop_bytes:
            raise InvalidArgumentError(
                f"each stop string must be 1 to {limits.max_stop_bytes} bytes, got {size}"
            )


def validate_request(request: TurnRequest, limits: LimitsConfig) -> None:
    """Check a turn's fields against ``limits``; raises InvalidArgumentError naming the field."""
    if not request.message.strip():
        raise InvalidArgumentError("message must not be empty")
    if len(request.message) > limits.max_message_chars:
        raise InvalidArgumentError(
            f"message is {len(request.message)} characters; the limit is {limits.max_message_chars}"
        )
    if len(request.idempotency_key.encode()) > limits.max_idempotency_key_bytes:
        raise InvalidArgumentError(
            f"idempotency_key must be at most {limits.max_idempotency_key_bytes} bytes"
        )
    if len(request.model) > limits.max_model_name_chars:
        raise InvalidArgumentError(
            f"model name must be at most {limits.max_model_name_chars} characters"
        )
    validate_params(request.params, limits)
    validate_context(request, limits)


def validate_context(request: TurnRequest, limits: LimitsConfig) -> None:
    """Check a turn's client-kept context: its roles, how many and how long."""
    context = request.context
    if not context:
        return
    if request.conversation_id:
        raise InvalidArgumentError(
            "context must be empty when conversation_id is set (the stored history is used)"
        )
    if len(context) > limits.max_history_messages:
        raise InvalidArgumentError(
            f"context has {len(context)} messages; the limit is {limits.max_history_messages}"
        )
    for i, message in enumerate(context):
        if message.role not in _CONTEXT_ROLES:
            raise InvalidArgumentError(
                f"context[{i}].role must be 'system', 'user' or 'assistant', got {message.role!r}"
            )
        if len(message.content) > limits.max_message_chars:
            raise InvalidArgumentError(
                f"context[{i}].content is {len(message.content)} characters; "
                f"the limit is {limits.max_message_chars}"
            )


class Capacity:
    """The turns one model may run at once; reserved before anything is stored.

    ``reserve`` checks and counts in one synchronous step, so concurrent turns
    cannot both take the last place.
    """

    __slots__ = ("limit", "model", "used")

    def __init__(self, model: str, limit: int) -> None:
        self.model = model
        self.limit = max(1, limit)
        self.used = 0

    def reserve(self) -> None:
        """Take a place, or raise ResourceExhaustedError (with a retry delay)."""
        if self.used >= self.limit:
            raise ResourceExhaustedError(
                f"model {self.model!r} is at capacity ({self.used} answers running); retry shortly",
                retry_after_s=_RETRY_AFTER_S,
            )
        self.used += 1

    def release(self) -> None:
        """Give a place back."""
        self.used -= 1
