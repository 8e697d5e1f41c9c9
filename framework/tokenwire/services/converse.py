"""One ``Converse`` session: a reader task takes the client's actions; turns run one at a time.

Responses wait for the client in a bounded outbox: a client that stops reading
stops its own session (once gRPC's send window is full the outbox fills, the
turn waits and stops pulling from the engine, the reader stops taking requests
and gRPC flow control holds the client back), never the server's memory. While
the client is behind, consecutive deltas of the running turn merge into one
message (up to ``MERGE_TOKENS`` tokens) instead of queueing one per chunk; a
client that keeps up gets every delta on its own.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

from tokenwire.backend import FinishReason
from tokenwire.context import CallState
from tokenwire.errors import (
    CancelledError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from tokenwire.interceptors.base import UndecodableRequest
from tokenwire.logs import get_logger
from tokenwire.proto.v1 import chat_pb2
from tokenwire.services.convert import ResponseEvents, turn_error, turn_request
from tokenwire.turns.detached import Detached
from tokenwire.turns.events import TurnState

if TYPE_CHECKING:
    from tokenwire.turns.runner import TurnRunner

__all__ = ["MERGE_TOKENS", "ConverseSession", "Outbox", "shutting_down"]

_log = get_logger("tokenwire.converse")
_EVENTS = ResponseEvents(chat_pb2.ConverseResponse)
MERGE_TOKENS = 256
"""Most tokens one waiting delta takes in by merging; then the turn waits for the client."""


def shutting_down() -> UnavailableError:
    """The error a draining server answers new turns and calls with."""
    return UnavailableError("server is shutting down; retry on another server")


class Outbox:
    """A session's responses on their way to the client: bounded, deltas merge while waiting.

    ``put`` waits while ``limit`` messages wait already, unless the new message is a
    delta that merges into a waiting one (holding fewer than :data:`MERGE_TOKENS`
    tokens). ``get`` returns None once closed and empty.
    """

    __slots__ = ("_closed", "_getter", "_items", "_limit", "_space")

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[chat_pb2.ConverseResponse] = collections.deque()
        self._limit = max(1, limit)
        self._getter: asyncio.Future[None] | None = None
        self._space: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, response: chat_pb2.ConverseResponse) -> None:
        """Queue ``response`` (or merge it into a waiting delta); waits while full.
        Dropped once the outbox is closed: nobody reads it any more."""
        items = self._items
        if self._closed:
            return
        if items:
            last = items[-1]
            if (
                response.HasField("delta")
                and last.HasField("delta")
                and last.delta.token_count < MERGE_TOKENS
            ):
                last.delta.text += response.delta.text
                last.delta.token_count += response.delta.token_count
                return
            while len(items) >= self._limit and not self._closed:
                space = asyncio.get_running_loop().create_future()
                self._space.append(space)
                try:
                    await space
                finally:
                    if not space.done():
                        space.cancel()
        items.append(response)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    async def get(self) -> chat_pb2.ConverseResponse | None:
        """The next response; None once the outbox is closed and empty."""
        items = self._items
        while not items:
            if self._closed:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        response = items.popleft()
        while self._space:
            space = self._space.popleft()
            if not space.done():
                space.set_result(None)
                break
        return response

    def close(self) -> None:
        """No more responses: ``get`` drains what waits, then returns None."""
        self._closed = True
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
        for space in self._space:
            if not space.done():
                space.set_result(None)


class ConverseSession:
    """One Converse stream: the reader task takes actions; each turn runs in its own task."""

    def __init__(
        self,
        turns: TurnRunner,
        call: CallState,
        requests: AsyncIterator[chat_pb2.ConverseRequest | UndecodableRequest],
        *,
        outbox_limit: int,
        sessions: set[ConverseSession] | None = None,
        detached: Detached | None = None,
    ) -> None:
        self._turns = turns
        self._call = call
        self._requests = requests
        self._out = Outbox(outbox_limit)
        self._turn: asyncio.Task[None] | None = None
        self._state: TurnState | None = None
        self._cancel_requested = False
        self._reading = True
        self._closing = False
        self._sessions = sessions if sessions is not None else set()
        self._detached = detached if detached is not None else Detached()
        self._keyed = False  # the running turn has an idempotency key

    async def run(self) -> AsyncGenerator[chat_pb2.ConverseResponse, None]:
        """The session's responses, until the client half-closes and the last turn ended."""
        self._sessions.add(self)
        reader = asyncio.create_task(self._read())
        try:
            get = self._out.get
            while (response := await get()) is not None:
                yield response
        finally:
            # Closed first: a turn or the reader waiting for room in the outbox goes on
            # (and sees its cancellation) instead of waiting for a reader that is gone.
            self._out.close()
            reader.cancel()
            turn = self._turn
            if turn is not None and self._keyed and not turn.done():
                # A keyed turn outlives the stream: its client's retry attaches to it.
                self._detached.keep(turn, self._state.turn_id if self._state else "")
                turn = None
            elif turn is not None:
                turn.cancel()
            await asyncio.gather(reader, *(t for t in (turn,) if t), return_exceptions=True)
            self._sessions.discard(self)

    def end_when_idle(self) -> None:
        """Drain: refuse new turns; end the stream once the running turn finished."""
        self._closing = True
        if self._turn is None or self._turn.done():
            self._out.close()

    async def _read(self) -> None:
        try:
            async for request in self._requests:
                if isinstance(request, UndecodableRequest):
                    _log.info("undecodable request refused", reason=request.message)
                    await self._error(InvalidArgumentError(request.message))
                    continue
                action = request.WhichOneof("action")
                if action == "start":
                    await self._start(request.start)
                elif action == "cancel":
                    self._cancel(request.cancel.turn_id)
                else:
                    await self._error(
                        InvalidArgumentError("the request names no action: set start or cancel")
                    )
        except asyncio.CancelledError:
            raise
        except Exception:
            # The stream broke under us (client gone); run() is being torn down too.
            _log.debug("converse request stream ended abnormally", exc_info=True)
        self._reading = False
        if self._turn is None or self._turn.done():
            self._out.close()

    async def _start(self, start: chat_pb2.StartTurn) -> None:
        running = self._turn is not None and not self._turn.done()
        if running and self._state is not None and not self._state.final_sent:
            await self._error(
                FailedPreconditionError(
                    "a turn is already running on this stream; send CancelTurn or wait for "
                    "TurnFinished"
                )
            )
            return
        if running:  # the previous turn sent TurnFinished and is finishing its last step
            assert self._turn is not None
            await asyncio.wait({self._turn})
        if self._closing:  # checked after the wait: a drain may have begun during it
            await self._error(shutting_down())
            return
        self._state = TurnState()
        self._cancel_requested = False
        self._keyed = bool(start.idempotency_key)
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
            # A retry attached to a keyed turn that runs on here: cancel that turn too.
            self._detached.cancel(state.turn_id)

    async def _error(self, exc: Exception, turn_id: str = "") -> None:
        response = turn_error(exc, turn_id)
        if response.error.error_type == "internal":
            _log.error("turn failed", exc_info=exc, turn_id=turn_id)
        await self._out.put(response)

    async def _run_turn(self, start: chat_pb2.StartTurn, state: TurnState) -> None:
        responses = self._turns.run(turn_request(start), self._call, _EVENTS, state)
        put = self._out.put
        started = False  # TurnStarted is in the outbox: the client will see it
        try:
            try:
                async for response in responses:
                    await put(response)
                    started = True
            finally:
                await responses.aclose()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            # Only CancelTurn's own cancel is handled here; another one (the stream
            # ending) still stands after uncancel() and goes on up.
            if not self._cancel_requested or task.uncancel() > 0:
                raise
            # CancelTurn: the turn is closed (the engine stopped); report what was sent.
            if started:
                await put(_EVENTS.finished(state.finished_event(FinishReason.CANCELLED)))
            else:
                await self._error(CancelledError("the turn was cancelled before it started"))
        except Exception as exc:
            await self._error(exc, state.turn_id if state.message_id else "")
        finally:
            if self._closing or not self._reading:
                self._out.close()
