"""``tokenwire.v1.ChatService``: the gRPC face of the turn runner.

``Complete`` streams one turn; errors end the call with a status (mapped by the
errors interceptor). ``Converse`` is a long-lived session
(:mod:`tokenwire.services.converse`): turns run one at a time, ``CancelTurn``
ends the running one with FINISH_REASON_CANCELLED, and a failed turn is reported
as a ``TurnError`` while the stream stays open.

Both return the turn's stream itself, with no generator of their own in
between: the interceptor chain iterates it (a server always runs one, see
:mod:`tokenwire.pipeline`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from tokenwire.context import current_call
from tokenwire.interceptors.base import UndecodableRequest
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc
from tokenwire.services.converse import ConverseSession, shutting_down
from tokenwire.services.convert import ResponseEvents, turn_request
from tokenwire.turns.detached import Detached
from tokenwire.turns.events import TurnState
from tokenwire.turns.runner import TurnRunner

__all__ = ["ChatServicer"]

_EVENTS = ResponseEvents(chat_pb2.CompleteResponse)
Context = grpc.aio.ServicerContext[Any, Any]


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Serves Complete and Converse; :meth:`drain` ends sessions at their next idle point."""

    def __init__(self, turns: TurnRunner, *, outbox_limit: int = 16) -> None:
        self.turns = turns
        self._outbox_limit = outbox_limit
        self._sessions: set[ConverseSession] = set()
        self.detached = Detached()
        self.draining = False

    def Complete(
        self, request: chat_pb2.CompleteRequest, context: Context
    ) -> AsyncGenerator[chat_pb2.CompleteResponse, None]:
        if self.draining:
            raise shutting_down()
        # An undecodable request never gets here: the chain refuses it (INVALID_ARGUMENT).
        if not request.idempotency_key:
            return self.turns.run(turn_request(request), current_call(), _EVENTS)
        # A keyed turn outlives the call, for the retry to attach to.
        state = TurnState()
        responses = self.turns.run(turn_request(request), current_call(), _EVENTS, state)
        return self.detached.stream(responses, state.turn_id)

    def Converse(
        self,
        request_iterator: AsyncIterator[chat_pb2.ConverseRequest | UndecodableRequest],
        context: Context,
    ) -> AsyncGenerator[chat_pb2.ConverseResponse, None]:
        if self.draining:
            raise shutting_down()
        session = ConverseSession(
            self.turns,
            current_call(),
            request_iterator,
            outbox_limit=self._outbox_limit,
            sessions=self._sessions,
            detached=self.detached,
        )
        return session.run()

    def drain(self) -> None:
        """Refuse new turns; end each Converse session once its running turn finishes."""
        self.draining = True
        for session in list(self._sessions):
            session.end_when_idle()
