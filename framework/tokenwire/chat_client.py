"""The ``tokenwire chat`` terminal client.

With a question on the command line it streams one answer from
``ChatService.Complete`` and exits; without one it opens an interactive session
on one long-lived ``ChatService.Converse`` stream, so the server keeps the
conversation's history between turns::

    $ tokenwire chat "What is the capital of France?"
    The capital of France is Paris.
    $ tokenwire chat --temperature 0.7
    you> Tell me a joke.
    bot> ...

In a session, Ctrl-C while an answer streams cancels that turn; Ctrl-C or
Ctrl-D at the prompt quits. ``/new`` starts a new conversation, ``/quit`` quits.
The coroutines work from code too::

    result = await ask("127.0.0.1:50051", "Hi!", out=sys.stdout)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

import grpc

from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc

if TYPE_CHECKING:
    from tokenwire.proto.v1.chat_pb2_grpc import ChatServiceAsyncStub

    _ConverseCall: TypeAlias = grpc.aio.StreamStreamCall[
        chat_pb2.ConverseRequest, chat_pb2.ConverseResponse
    ]

__all__ = [
    "API_KEY_ENV",
    "API_KEY_FILE_ENV",
    "DEFAULT_API_KEY_FILE",
    "DEFAULT_TARGET",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID_ARGUMENT",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "TARGET_ENV",
    "ChatOptions",
    "ChatSession",
    "LineReader",
    "TurnResult",
    "add_arguments",
    "ask",
    "exit_code_for",
    "main",
    "run_interactive",
    "run_one_shot",
]

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where the client looks for a server when neither flag nor environment says."""
TARGET_ENV = "TOKENWIRE_TARGET"
"""Environment variable that overrides :data:`DEFAULT_TARGET`."""
API_KEY_ENV = "TOKENWIRE_API_KEY"
API_KEY_FILE_ENV = "TOKENWIRE_API_KEY_FILE"
DEFAULT_API_KEY_FILE = ".tokenwire/admin.key"
"""Environment variable holding the API key, which keeps it out of shell history."""

# Exit codes. 2 matches what argparse returns for a bad command line; 130 is
# 128 + SIGINT, as shells report a program ended by Ctrl-C.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID_ARGUMENT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

LineReader: TypeAlias = Callable[[], Awaitable[str | None]]
"""Reads the user's next line (trailing newline optional); ``None`` at end of input."""

_CLOSE_GRACE_S = 1.0  # How long a finished session waits for the server to end the stream.
_FINISH_NOTES: dict[int, str] = {
    chat_pb2.FINISH_REASON_UNSPECIFIED: "[stopped: the server gave no reason]",
    chat_pb2.FINISH_REASON_LENGTH: "[stopped: max tokens reached]",
    chat_pb2.FINISH_REASON_CANCELLED: "[cancelled]",
    chat_pb2.FINISH_REASON_CONTENT_FILTER: "[stopped: content filter]",
    chat_pb2.FINISH_REASON_ERROR: "[stopped: the model failed mid-answer]",
}
_EXIT_CODES = {
    grpc.StatusCode.OK: EXIT_OK,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID_ARGUMENT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
}
# TurnError carries a google.rpc.Code number; this names it like a gRPC status.
_STATUS_BY_NUMBER = {int(code.value[0]): code for code in grpc.StatusCode}


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:  # Also refuses NaN.
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def _option(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    metavar: str | None = None,
    **extra: Any,
) -> Any:
    """A ChatOptions field; ``help`` documents it and becomes its flag's help text."""
    metadata = {"help": help, "flags": flags, "metavar": metavar, **extra}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class ChatOptions:
    """How every turn of a chat is asked; each field is a ``tokenwire chat`` flag too.

    As in ``SamplingParams``, zero values mean "the server's default" (a zero
    temperature is greedy decoding)::

        options = ChatOptions(temperature=0.7, max_tokens=256, stop=("\\n\\n",))
    """

    model: str = _option("", "model to answer with (default: the server's default)")
    temperature: float = _option(0.0, "sampling temperature in [0, 2]; 0 is greedy (default)")
    top_p: float = _option(
        0.0, "sample from the likeliest tokens whose probabilities add up to P", metavar="P"
    )
    top_k: int = _option(0, "sample from the K likeliest tokens only", metavar="K")
    max_tokens: int = _option(0, "most tokens per answer (default: the server's)", metavar="N")
    seed: int | None = _option(None, "sampling seed, for answers that repeat", type=int)
    stop: tuple[str, ...] = _option((), "end answers before TEXT; repeatable", metavar="TEXT")
    conversation_id: str = _option(
        "",
        "continue this conversation (--verbose prints ids)",
        flags=("--conversation",),
        metavar="ID",
    )
    timeout_s: float | None = _option(
        None,
        "give up on an answer after this many seconds (default: never)",
        flags=("--timeout",),
        metavar="SECONDS",
        type=_positive_seconds,
    )
    api_key: str | None = _option(
        None, f"API key, sent as a bearer token (default: ${API_KEY_ENV})", metavar="KEY", type=str
    )
    verbose: bool = _option(
        False, "print token usage and time to first token", flags=("-v", "--verbose")
    )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ChatOptions:
        """Build options from a namespace parsed with :func:`add_arguments`."""
        values = {option.name: getattr(args, option.name) for option in fields(cls)}
        api_key = args.api_key or _read_key_file(getattr(args, "api_key_file", None))
        return cls(**values | {"stop": tuple(args.stop or ()), "api_key": api_key})

    def sampling_params(self) -> chat_pb2.SamplingParams:
        """The ``SamplingParams`` message these options describe."""
        params = chat_pb2.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            stop=list(self.stop),
        )
        # seed is proto3 `optional`: only a field that is set asks for a seed.
        if self.seed is not None:
            params.seed = self.seed
        return params

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata: the API key as a bearer token, or ``None`` without one."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None


@dataclass(frozen=True, kw_only=True)
class TurnResult:
    """One finished turn: the whole answer and what the server said about it."""

    text: str
    """The answer, all deltas joined."""
    finish_reason: chat_pb2.FinishReason.ValueType
    """Why the turn ended (``FINISH_REASON_UNSPECIFIED`` if the server never said)."""
    turn_id: str = ""
    """Server-assigned id of the turn."""
    conversation_id: str = ""
    """The conversation the turn belongs to; pass it on to continue it."""
    model: str = ""
    """The model that answered."""
    usage: chat_pb2.Usage = field(default_factory=chat_pb2.Usage)
    """Token accounting and time to first token."""


def _read_key_file(path: str | None) -> str | None:
    """The key in ``path`` (first line), or None when there is no such file."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().strip() or None
    except OSError:
        return None


def exit_code_for(code: grpc.StatusCode) -> int:
    """The process exit code for a gRPC status that ended the chat.

    >>> exit_code_for(grpc.StatusCode.UNAVAILABLE)
    3
    """
    return _EXIT_CODES.get(code, EXIT_FAILURE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``tokenwire chat`` arguments to ``parser``.

    ::

        chat_client.add_arguments(subparsers.add_parser("chat", help="chat with a server"))
    """
    parser.add_argument(
        "question", nargs="?", help="ask one question and exit; without it, chat interactively"
    )
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"server address (default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--api-key-file",
        default=os.environ.get(API_KEY_FILE_ENV) or DEFAULT_API_KEY_FILE,
        metavar="FILE",
        help=f"read the API key from FILE when no key is given (default: ${API_KEY_FILE_ENV} "
        f"or {DEFAULT_API_KEY_FILE}, where `tokenwire serve` writes its first admin key)",
    )
    # The key defaults from the environment, and is never echoed, to keep it out of
    # shell history and --help output.
    env_defaults = {"api_key": os.environ.get(API_KEY_ENV) or None}
    for option in fields(ChatOptions):
        meta = option.metadata
        flags = meta["flags"] or ("--" + option.name.replace("_", "-"),)
        kwargs: dict[str, Any] = {"dest": option.name, "help": meta["help"]}
        if isinstance(option.default, bool):
            kwargs["action"] = "store_true"
        elif isinstance(option.default, tuple):
            kwargs.update(action="append", metavar=meta["metavar"])
        else:
            kwargs.update(
                type=meta.get("type") or type(option.default),
                default=env_defaults.get(option.name, option.default),
                metavar=meta["metavar"],
            )
        parser.add_argument(*flags, **kwargs)


def main(args: argparse.Namespace) -> int:
    """Run ``tokenwire chat`` for arguments parsed with :func:`add_arguments`.

    Returns the exit code: ``EXIT_OK``, ``EXIT_FAILURE``,
    ``EXIT_INVALID_ARGUMENT``, ``EXIT_UNAVAILABLE`` or ``EXIT_INTERRUPTED``.
    """
    options = ChatOptions.from_args(args)
    try:
        if args.question is not None:
            return asyncio.run(run_one_shot(args.target, args.question, options=options))
        return asyncio.run(run_interactive(args.target, options=options))
    except KeyboardInterrupt:
        # Ctrl-C outside a session turn, e.g. while a one-shot answer streams.
        _write(sys.stderr, "\n[interrupted]\n")
        return EXIT_INTERRUPTED


async def ask(
    target: str, question: str, *, options: ChatOptions | None = None, out: TextIO | None = None
) -> TurnResult:
    """Ask one question with ``ChatService.Complete``; stream the answer to ``out``.

    Each delta is written and flushed as it arrives, then a newline. Raises
    ``grpc.aio.AioRpcError`` when the call fails::

        result = await ask("127.0.0.1:50051", "What is 2 + 2?", out=sys.stdout)
    """
    options = options or ChatOptions()
    request = chat_pb2.CompleteRequest(
        conversation_id=options.conversation_id,
        message=question,
        params=options.sampling_params(),
        model=options.model,
    )
    started, finished = chat_pb2.TurnStarted(), chat_pb2.TurnFinished()
    texts: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub: ChatServiceAsyncStub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.Complete(request, timeout=options.timeout_s, metadata=options.metadata())
        try:
            async for response in call:
                event = response.WhichOneof("event")
                if event == "started":
                    started.CopyFrom(response.started)
                elif event == "delta":
                    texts.append(response.delta.text)
                    if out is not None:
                        _write(out, response.delta.text)
                elif event == "finished":
                    finished.CopyFrom(response.finished)
        except grpc.aio.AioRpcError:
            # End a partial answer's line so the error starts on a line of its own.
            if out is not None and any(texts):
                _write(out, "\n")
            raise
    if out is not None:
        _write(out, "\n")
    return TurnResult(
        text="".join(texts),
        finish_reason=finished.finish_reason,
        turn_id=started.turn_id,
        conversation_id=started.conversation_id,
        model=started.model,
        usage=finished.usage,
    )


async def run_one_shot(
    target: str,
    question: str,
    *,
    options: ChatOptions | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Ask one question, print the answer to ``out`` (stdout) and notes to ``err`` (stderr).

    Returns the exit code: a failed call prints ``error: <CODE>: <details>``
    and maps its status with :func:`exit_code_for`; an answer the model failed
    to finish is ``EXIT_FAILURE``; any other finished answer is ``EXIT_OK``.
    """
    options = options or ChatOptions()
    err = err or sys.stderr
    try:
        result = await ask(target, question, options=options, out=out or sys.stdout)
    except grpc.aio.AioRpcError as error:
        _report_failure(err, error.code(), error.details() or "", target)
        return exit_code_for(error.code())
    _report_finish(err, result, cancel_note=None, verbose=options.verbose)
    return EXIT_FAILURE if result.finish_reason == chat_pb2.FINISH_REASON_ERROR else EXIT_OK


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
            _write(self._out, "\n")
            return exit_code
        except grpc.aio.AioRpcError as error:
            _report_failure(self._err, error.code(), error.details() or "", self._target)
            exit_code = exit_code_for(error.code())
            return exit_code
        finally:
            await self._close(graceful=exit_code == EXIT_OK)

    def _command(self, command: str) -> None:
        if command == "/new":
            self._conversation_id = ""
            _write(self._err, "[new conversation]\n")
        else:
            _write(
                self._err,
                f"unknown command {command}; /new starts a new conversation, /quit quits\n",
            )

    async def _prompt(self, read_line: LineReader) -> str | None:
        if self._quit.is_set():
            return None
        _write(self._out, "you> ")
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
            _write(self._out, "\n")
            _write(self._err, "[interrupted]\n")
            return EXIT_INTERRUPTED
        error = turn.task.exception()
        if isinstance(error, _StreamFailure):
            _report_failure(self._err, error.code, error.details, self._target)
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
                _write(self._out, "bot> ")
                if turn.cancel_note is not None:
                    await self._send_cancel(turn)
            elif event == "delta":
                texts.append(response.delta.text)
                _write(self._out, response.delta.text)
            elif event in ("finished", "error"):
                if turn.answering:
                    _write(self._out, "\n")
                if event == "error":
                    error = response.error
                    _write(self._err, f"error: {_code_name(error.code)}: {error.message}\n")
                    return
                result = TurnResult(
                    text="".join(texts),
                    finish_reason=response.finished.finish_reason,
                    turn_id=started.turn_id,
                    conversation_id=started.conversation_id,
                    model=started.model,
                    usage=response.finished.usage,
                )
                _report_finish(
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


def _report_finish(
    err: TextIO, result: TurnResult, *, cancel_note: str | None, verbose: bool
) -> None:
    reason = result.finish_reason
    if reason == chat_pb2.FINISH_REASON_CANCELLED and cancel_note is not None:
        _write(err, cancel_note + "\n")
    elif reason != chat_pb2.FINISH_REASON_STOP:
        _write(err, _FINISH_NOTES.get(reason, f"[stopped: finish reason {reason}]") + "\n")
    if verbose:
        usage = result.usage
        _write(
            err,
            f"[conversation {result.conversation_id}, turn {result.turn_id}, "
            f"model {result.model or '?'}: {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} completion tokens, "
            f"first token after {usage.time_to_first_token_ms:.0f} ms]\n",
        )


def _report_failure(err: TextIO, code: grpc.StatusCode | None, details: str, target: str) -> None:
    if code is None:
        _write(err, f"error: {details}\n")
        return
    _write(err, f"error: {code.name}: {details}\n" if details else f"error: {code.name}\n")
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {target}" if target else ""
        _write(err, f"is the server running{where}? Start one with: tokenwire serve\n")


def _code_name(number: int) -> str:
    code = _STATUS_BY_NUMBER.get(number)
    return code.name if code is not None else f"code {number}"


def _write(stream: TextIO, text: str) -> None:
    # Flushed at once so tokens show as they arrive, not when a buffer fills.
    stream.write(text)
    stream.flush()
