"""``tokenwire.v1.ChatService`` and ``ModelService``: the gRPC face of the turn runner.

``Complete`` streams one turn; errors end the call with a status (mapped by the
errors interceptor). ``Converse`` is a long-lived session: turns run one at a
time, ``CancelTurn`` ends the running one with FINISH_REASON_CANCELLED, and a
failed turn is reported as a ``TurnError`` while the stream stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import grpc

from tokenwire.backend import FinishReason
from tokenwire.errors import CancelledError, FailedPreconditionError, UnavailableError, status_of
from tokenwire.frontend import ChatModel
from tokenwire.logs import get_logger
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc, models_pb2, models_pb2_grpc
from tokenwire.turns import TurnRunner, TurnState

__all__ = ["ChatServicer", "ModelServicer"]

_log = get_logger("tokenwire.chat")
Context = grpc.aio.ServicerContext[Any, Any]


def _shutting_down() -> UnavailableError:
    return UnavailableError("server is shutting down; retry on another server")


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Serves Complete and Converse; :meth:`drain` ends sessions at their next idle point."""

    def __init__(self, turns: TurnRunner) -> None:
        self.turns = turns
        self._sessions: set[_Session] = set()
        self.draining = False

    async def Complete(
        self, request: chat_pb2.CompleteRequest, context: Context
    ) -> AsyncIterator[chat_pb2.CompleteResponse]:
        if self.draining:
            raise _shutting_down()
        responses = self.turns.run(request, chat_pb2.CompleteResponse, TurnState())
        async with contextlib.aclosing(responses):
            async for response in responses:
                yield response

    async def Converse(
        self, request_iterator: AsyncIterator[chat_pb2.ConverseRequest], context: Context
    ) -> AsyncIterator[chat_pb2.ConverseResponse]:
        if self.draining:
            raise _shutting_down()
        session = _Session(self, request_iterator)
        self._sessions.add(session)
        try:
            responses = session.run()
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response
        finally:
            self._sessions.discard(session)

    def drain(self) -> None:
        """Refuse new turns; end each Converse session once its running turn finishes."""
        self.draining = True
        for session in list(self._sessions):
            session.end_when_idle()


class _Session:
    """One Converse stream: a reader task feeds turns; responses flow through a queue."""

    def __init__(
        self, servicer: ChatServicer, requests: AsyncIterator[chat_pb2.ConverseRequest]
    ) -> None:
        self._servicer = servicer
        self._requests = requests
        self._out: asyncio.Queue[chat_pb2.ConverseResponse | None] = asyncio.Queue()
        self._turn: asyncio.Task[None] | None = None
        self._state: TurnState | None = None
        self._cancel_requested = False
        self._reading = True
        self._closing = False

    async def run(self) -> AsyncGenerator[chat_pb2.ConverseResponse, None]:
        reader = asyncio.create_task(self._read())
        try:
            while (response := await self._out.get()) is not None:
                yield response
        finally:
            reader.cancel()
            if self._turn is not None:
                self._turn.cancel()
            await asyncio.gather(reader, *(t for t in (self._turn,) if t), return_exceptions=True)

    def end_when_idle(self) -> None:
        self._closing = True
        if self._turn is None or self._turn.done():
            self._out.put_nowait(None)

    async def _read(self) -> None:
        try:
            async for request in self._requests:
                action = request.WhichOneof("action")
                if action == "start":
                    self._start(request.start)
                elif action == "cancel":
                    self._cancel(request.cancel.turn_id)
                else:
                    self._error(
                        FailedPreconditionError("request names no action (start or cancel)")
                    )
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            raise
        except Exception:
            # The stream broke under us (client gone); run() is being torn down too.
            _log.debug("converse request stream ended abnormally", exc_info=True)
        self._reading = False
        if self._turn is None or self._turn.done():
            self._out.put_nowait(None)

    def _start(self, start: chat_pb2.StartTurn) -> None:
        running = self._turn is not None and not self._turn.done()
        if running and self._state is not None and not self._state.final_sent:
            self._error(
                FailedPreconditionError(
                    "a turn is already running on this stream; send CancelTurn or wait for "
                    "TurnFinished"
                )
            )
            return
        if self._servicer.draining:
            self._error(_shutting_down())
            return
        self._state = TurnState()
        self._cancel_requested = False
        self._turn = asyncio.create_task(self._run_turn(start, self._state))

    def _cancel(self, turn_id: str) -> None:
        running = self._turn is not None and not self._turn.done()
        state = self._state
        # A turn whose answer already ended is not cancelled: its TurnFinished says how.
        if (
            running
            and state is not None
            and not state.finished
            and not state.final_sent
            and (turn_id in ("", state.turn_id))
        ):
            self._cancel_requested = True
            assert self._turn is not None
            self._turn.cancel()

    def _error(self, exc: Exception, turn_id: str = "") -> None:
        code, message, error_type = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            _log.error("turn failed", exc_info=exc, turn_id=turn_id)
        error = chat_pb2.TurnError(
            code=code.value[0],
            message=message,
            error_type=error_type,
            turn_id=turn_id,
            retry_after_s=getattr(exc, "retry_after_s", None) or 0.0,
            filter_category=getattr(exc, "category", ""),
        )
        self._out.put_nowait(chat_pb2.ConverseResponse(error=error))

    async def _run_turn(self, start: chat_pb2.StartTurn, state: TurnState) -> None:
        responses = self._servicer.turns.run(start, chat_pb2.ConverseResponse, state)
        put = self._out.put_nowait
        try:
            async with contextlib.aclosing(responses):
                async for response in responses:
                    put(response)
        except asyncio.CancelledError:
            if not self._cancel_requested:
                raise
            # CancelTurn: the generator is closed (the engine stopped); report what was sent.
            if state.message_id:
                put(
                    chat_pb2.ConverseResponse(finished=state.finished_event(FinishReason.CANCELLED))
                )
            else:
                self._error(CancelledError("the turn was cancelled before it started"))
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        except Exception as exc:
            self._error(exc, state.turn_id if state.message_id else "")
        finally:
            if self._closing or not self._reading:
                put(None)


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """Lists the served models, the default first."""

    def __init__(self, models: Mapping[str, ChatModel], backend_name: str) -> None:
        self._models = models
        self._backend_name = backend_name

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(
            models=[
                models_pb2.Model(
                    name=name,
                    backend=self._backend_name,
                    context_length=model.context_length,
                    is_default=index == 0,
                )
                for index, (name, model) in enumerate(self._models.items())
            ]
        )
