"""Protobuf at the edge: chat requests to plain turns, plain events to chat responses.

The only code besides the servicers that builds or reads ``tokenwire.v1`` chat
messages; the turn logic (:mod:`tokenwire.turns`) works on plain types.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from tokenwire.backend import ChatMessage, FinishReason
from tokenwire.errors import status_of
from tokenwire.model.frontend import TurnParams
from tokenwire.proto.v1 import chat_pb2
from tokenwire.turns.events import Finished, Started, TurnRequest

__all__ = [
    "ResponseEvents",
    "finished_message",
    "started_message",
    "turn_error",
    "turn_request",
]

_FINISH = {
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: chat_pb2.FINISH_REASON_CANCELLED,
    FinishReason.CONTENT_FILTER: chat_pb2.FINISH_REASON_CONTENT_FILTER,
    FinishReason.ERROR: chat_pb2.FINISH_REASON_ERROR,
}

R = TypeVar("R", chat_pb2.CompleteResponse, chat_pb2.ConverseResponse)


def turn_request(request: chat_pb2.CompleteRequest | chat_pb2.StartTurn) -> TurnRequest:
    """The plain turn a Complete request or a StartTurn asks for (validated later)."""
    params = request.params
    return TurnRequest(
        message=request.message,
        conversation_id=request.conversation_id,
        params=TurnParams(
            temperature=params.temperature,
            top_p=params.top_p or 1.0,
            top_k=params.top_k,
            max_tokens=params.max_tokens,
            stop=tuple(params.stop),
            seed=params.seed if params.HasField("seed") else None,
        ),
        model=request.model,
        idempotency_key=request.idempotency_key,
        context=tuple(ChatMessage(m.role, m.content) for m in request.context),
    )


def started_message(event: Started) -> chat_pb2.TurnStarted:
    return chat_pb2.TurnStarted(
        turn_id=event.turn_id,
        conversation_id=event.conversation_id,
        message_id=event.message_id,
        model=event.model,
    )


def finished_message(event: Finished) -> chat_pb2.TurnFinished:
    usage = event.usage
    return chat_pb2.TurnFinished(
        finish_reason=_FINISH[event.finish_reason],
        usage=chat_pb2.Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            time_to_first_token_ms=usage.time_to_first_token_ms,
        ),
        turn_id=event.turn_id,
        filter_category=event.filter_category,
    )


class ResponseEvents(Generic[R]):
    """A turn's events as messages of one RPC's response type (its ``event`` oneof)."""

    __slots__ = ("_response",)
    _response: type[R]

    def __init__(self, response: type[R]) -> None:
        self._response = response

    def started(self, event: Started) -> R:
        return self._response(started=started_message(event))

    def delta(self, text: str, token_count: int) -> R:
        # Set in place: a Delta passed to the constructor would be built, then copied.
        response = self._response()
        delta = response.delta
        delta.text = text
        delta.token_count = token_count
        return response

    def finished(self, event: Finished) -> R:
        return self._response(finished=finished_message(event))


def turn_error(exc: BaseException, turn_id: str = "") -> chat_pb2.ConverseResponse:
    """A failed turn as the ``TurnError`` a Converse stream reports instead of a status."""
    code, message, error_type = status_of(exc)
    return chat_pb2.ConverseResponse(
        error=chat_pb2.TurnError(
            code=int(code),
            message=message,
            error_type=error_type,
            turn_id=turn_id,
            retry_after_s=getattr(exc, "retry_after_s", None) or 0.0,
            filter_category=getattr(exc, "category", ""),
        )
    )
