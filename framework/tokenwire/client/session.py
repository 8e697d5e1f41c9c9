"""The interactive ``tokenwire chat`` session.

Without a question on the command line, ``tokenwire chat`` opens one long-lived
``ChatService.Converse`` stream, so the server keeps the conversation's history
between turns. Ctrl-C while an answer streams cancels that turn; Ctrl-C or
Ctrl-D at the prompt quits. ``/new`` starts a new conversation, ``/quit`` quits::

    exit_code = await run_interactive("127.0.0.1:50051", read_line=read_line)
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO, TypeAlias

import grpc

from tokenwire.client.options import ChatOptions
from tokenwire.client.results import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    TurnResult,
    exit_code_for,
    report_failure,
    report_finish,
    write_flushed,
)
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc

if TYPE_CHECKING:
    from tokenwire.proto.v1.chat_pb2_grpc import ChatServiceAsyncStub

    _ConverseCall: TypeAlias = grpc.aio.StreamStreamCall[
        chat_pb2.ConverseRequest, chat_pb2.ConverseResponse
    ]

__all__ = ["ChatSession", "LineReader", "run_interactive"]

LineReader: TypeAlias = Callable[[], Awaitable[str | None]]
"""Reads the user's next line (trailing newline optional); ``None`` at end of input."""

_CLOSE_GRACE_S = 1.0  # How long a finished session waits for the server to end the stream.
# TurnError carries a google.rpc.Code number; this names it like a gRPC status.
_STATUS_BY_NUMBER = {int(code.value[0]): code for code in grpc.StatusCode}


async def run_interactive(
    target: str,
    *,
    options: ChatOptions | None = None,
    read_line: LineReader | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Chat with the server at ``target`` until the user quits; returns the exit code.

    Reads stdin unless ``read_line`` is given. On the main thread, Ctrl-C goes
    to :meth:`ChatSession.interrupt` while the session runs.
    """
    channel = grpc.aio.insecure_channel(target)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    session = ChatSession(stub, options=options, out=out, err=err, target=target)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, session.interrupt)
        handles_sigint = True
    except (NotImplementedError, RuntimeError, ValueError):
        # Windows loops and loops off the main thread: Ctrl-C keeps its default.
        handles_sigint = False
    try:
        async with channel:
            return await session.run(read_line or _StdinLineReader(sys.stdin))
    finally:
        # Last, so Ctrl-C never raises KeyboardInterrupt while the channel closes.
        if handles_sigint:
            loop.remove_signal_handler(signal.SIGINT)


class ChatSession:
    """An interactive chat on one long-lived ``ChatService.Converse`` stream.

    Each turn continues the conversation the previous turn named, so the server
    answers with the whole history in mind. :meth:`interrupt` is what Ctrl-C
    does; a signal handler the loop runs may call it::

        async with grpc.aio.insecure_channel(target) as channel:
            session = ChatSession(chat_pb2_grpc.ChatServiceStub(channel))
            exit_code = await session.run(read_line)
    """

    def __init__(
        self,
        stub: ChatServiceAsyncStub,
        *,
        options: ChatOptions | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        target: str = "",
    ) -> None:
        self._stub = stub
        self._options = options or ChatOptions()
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self._target = target
        self._conversation_id = self._options.conversation_id
        self._call: _ConverseCall | None = None
        self._turn: _Turn | None = None
        self._quit = asyncio.Event()
        # A cancel may be sent from a callback while the turn's own task writes.
        self._write_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def conversation_id(self) -> str:
        """The conversation the next turn continues; empty for a new one."""
        return self._conversation_id

    def interrupt(self) -> None:
        """Do what Ctrl-C does.

        While an answer streams, cancel that turn and go on; a second interrupt
        during the same turn gives up on it and ends the session with
        ``EXIT_INTERRUPTED``. At the prompt, end the session with ``EXIT_OK``.
        """
        turn = self._turn
        if turn is None:
            self._quit.set()
            return
        turn.interrupts += 1
        if turn.interrupts == 1:
            self._request_cancel(turn, "[cancelled]")
        else:
            turn.task.cancel()

    async def run(self, read_line: LineReader) -> int:
        """Prompt, answer, repeat until the user quits; returns the exit code."""
        self._call = self._stub.Converse(None, metadata=self._options.metadata())
        exit_code = EXIT_OK
        try:
            # Fail before the first prompt rather than after the user typed a question.
            await self._call.wait_for_connection()
            while (line := await self._prompt(read_line)) is not None:
                message = line.strip()
                if message == "/quit":
                    return exit_code
                if message.startswith("/"):
                    self._command(message)
                elif message and (exit_code := await self._run_turn(message)) != EXIT_OK:
                    return exit_code
            # End of input or Ctrl-C at the prompt: leave the shell on a fresh line.
            write_flushed(self._out, "\n")
            return exit_code
        except grpc.aio.AioRpcError as error:
            report_failure(self._err, error.code(), error.details() or "", self._target)
            exit_code = exit_code_for(error.code())
            return exit_code
        finally:
            await self._close(graceful=exit_code == EXIT_OK)

    def _command(self, command: str) -> None:
        if command == "/new":
            self._conversation_id = ""
            write_flushed(self._err, "[new conversation]\n")
        else:
            write_flushed(
                self._err,
                f"unknown command {command}; /new starts a new conversation, /quit quits\n",
            )

    async def _prompt(self, read_line: LineReader) -> str | None:
        if self._quit.is_set():
            return None
        write_flushed(self._out, "you> ")
        reading = asyncio.ensure_future(read_line())
        quitting = asyncio.ensure_future(self._quit.wait())
        try:
            await asyncio.wait({reading, quitting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()
            quitting.cancel()
            await asyncio.gather(reading, quitting, return_exceptions=True)
        if self._quit.is_set() or reading.cancelled():
            return None
        return reading.result()

    async def _run_turn(self, message: str) -> int:
        """Run one turn; the exit code the session must end with, or ``EXIT_OK``."""
        turn = _Turn()
        turn.task = asyncio.create_task(self._converse_turn(message, turn))
        self._turn = turn
        timer = None
        if (timeout_s := self._options.timeout_s) is not None:
            note = f"[timed out after {timeout_s:g}s]"
            loop = asyncio.get_running_loop()
            timer = loop.call_later(timeout_s, self._request_cancel, turn, note)
        try:
            await asyncio.wait({turn.task})
        finally:
            self._turn = None
            if timer is not None:
                timer.cancel()
            turn.task.cancel()
        if turn.task.cancelled():  # A second Ctrl-C: the user gave up on the turn.
            write_flushed(self._out, "\n")
            write_flushed(self._err, "[interrupted]\n")
            return EXIT_INTERRUPTED
        error = turn.task.exception()
        if isinstance(error, _StreamFailure):
            report_failure(self._err, error.code, error.details, self._target)
            return EXIT_FAILURE if error.code is None else exit_code_for(error.code)
        if error is not None:
            raise error
        return EXIT_OK

    async def _converse_turn(self, message: str, turn: _Turn) -> None:
        start = chat_pb2.StartTurn(
            conversation_id=self._conversation_id,
            message=message,
            params=self._options.sampling_params(),
            model=self._options.model,
        )
        await self._send(chat_pb2.ConverseRequest(start=start))
        started = chat_pb2.TurnStarted()
        texts: list[str] = []
        while True:
            response = await self._receive()
            event = response.WhichOneof("event")
            if event == "started":
                started.CopyFrom(response.started)
                turn.turn_id = started.turn_id
                # The server keeps the history under this id; the next turn names it.
                self._conversation_id = started.conversation_id or self._conversation_id
                turn.answering = True
                write_flushed(self._out, "bot> ")
                if turn.cancel_note is not None:
                    await self._send_cancel(turn)
            elif event == "delta":
                texts.append(response.delta.text)
                write_flushed(self._out, response.delta.text)
            elif event in ("finished", "error"):
                if turn.answering:
                    write_flushed(self._out, "\n")
                if event == "error":
                    error = response.error
                    write_flushed(self._err, f"error: {_code_name(error.code)}: {error.message}\n")
                    return
                result = TurnResult(
                    text="".join(texts),
                    finish_reason=response.finished.finish_reason,
                    turn_id=started.turn_id,
                    conversation_id=started.conversation_id,
                    model=started.model,
                    usage=response.finished.usage,
                )
                report_finish(
                    self._err, result, cancel_note=turn.cancel_note, verbose=self._options.verbose
                )
                return

    def _request_cancel(self, turn: _Turn, note: str) -> None:
        if turn.cancel_note is not None or turn.task.done():
            return
        turn.cancel_note = note
        # Until TurnStarted names the turn, its task sends the cancel when it
        # does: a CancelTurn with an empty id could reach the server before the
        # turn starts and cancel nothing.
        if turn.turn_id:
            task = asyncio.get_running_loop().create_task(self._send_cancel(turn))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_cancel(self, turn: _Turn) -> None:
        if turn.cancel_sent:
            return
        turn.cancel_sent = True
        # A broken stream is reported once, by the turn's own read.
        with contextlib.suppress(_StreamFailure):
            cancel = chat_pb2.CancelTurn(turn_id=turn.turn_id)
            await self._send(chat_pb2.ConverseRequest(cancel=cancel))

    async def _send(self, request: chat_pb2.ConverseRequest) -> None:
        call = self._call
        assert call is not None  # Only a running session sends.
        async with self._write_lock:
            try:
                await call.write(request)
            except grpc.aio.AioRpcError as error:
                raise _StreamFailure(error.code(), error.details() or "") from None
            except asyncio.InvalidStateError:
                # Writing to a call that already ended; its status says why.
                raise await _StreamFailure.of(call) from None

    async def _receive(self) -> chat_pb2.ConverseResponse:
        call = self._call
        assert call is not None  # Only a running session receives.
        try:
            response = await call.read()
        except grpc.aio.AioRpcError as error:
            raise _StreamFailure(error.code(), error.details() or "") from None
        if not isinstance(response, chat_pb2.ConverseResponse):
            # EOF: the server ended the stream in the middle of a turn.
            raise await _StreamFailure.of(call)
        return response

    async def _close(self, *, graceful: bool) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        call, self._call = self._call, None
        if call is None:
            return
        if graceful and not call.done():
            # Half-close so the server ends the stream with OK instead of
            # counting every finished session as CANCELLED.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                async with asyncio.timeout(_CLOSE_GRACE_S):
                    await call.done_writing()
                    while isinstance(await call.read(), chat_pb2.ConverseResponse):
                        pass
        call.cancel()


@dataclass
class _Turn:
    """The client's view of the turn running on a Converse stream."""

    task: asyncio.Task[None] = field(init=False)
    turn_id: str = ""
    cancel_note: str | None = None  # Set once a cancel is asked for: what to print.
    cancel_sent: bool = False
    interrupts: int = 0  # Ctrl-C presses during this turn.
    answering: bool = False  # "bot> " is printed, so the answer's line needs ending.


class _StreamFailure(Exception):
    """The Converse stream itself broke; the session cannot go on."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    @classmethod
    async def of(cls, call: _ConverseCall) -> _StreamFailure:
        """The failure a finished call's status describes."""
        code = await call.code()
        if code == grpc.StatusCode.OK:
            return cls(None, "the server closed the session")
        return cls(code, await call.details() or "")


class _StdinLineReader:
    """Reads lines from a blocking stream on a daemon thread.

    Not ``run_in_executor``: executor threads are joined at exit, so a read
    still blocked when the user quits would keep the process alive until Enter.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: asyncio.Queue[str] | None = None
        self._eof = False

    async def __call__(self) -> str | None:
        if self._lines is None:
            self._lines = asyncio.Queue()
            args = (asyncio.get_running_loop(), self._lines)
            threading.Thread(target=self._pump, args=args, daemon=True).start()
        line = "" if self._eof else await self._lines.get()
        self._eof = not line
        return line.rstrip("\r\n") if line else None

    def _pump(self, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str]) -> None:
        line = "-"
        while line:
            try:
                line = self._stream.readline()
            except (OSError, ValueError):  # stdin closed under us counts as end of input
                line = ""
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            except RuntimeError:  # The loop closed while this thread waited for input.
                return


def _code_name(number: int) -> str:
    code = _STATUS_BY_NUMBER.get(number)
    return code.name if code is not None else f"code {number}"
