"""What the ``tokenwire chat`` one-shot client and interactive session share.

The options every turn is asked with, a finished turn's result, the exit codes
a chat ends with, and how finished turns and failures are reported::

    options = ChatOptions(temperature=0.7, verbose=True)
    exit_code_for(grpc.StatusCode.UNAVAILABLE)  # EXIT_UNAVAILABLE
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

import grpc

from tokenwire.proto.v1 import chat_pb2

__all__ = [
    "API_KEY_ENV",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID_ARGUMENT",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "ChatOptions",
    "TurnResult",
    "exit_code_for",
]

API_KEY_ENV = "TOKENWIRE_API_KEY"
"""Environment variable holding the API key, which keeps it out of shell history."""

# Exit codes. 2 matches what argparse returns for a bad command line; 130 is
# 128 + SIGINT, as shells report a program ended by Ctrl-C.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID_ARGUMENT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

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


def _write(stream: TextIO, text: str) -> None:
    # Flushed at once so tokens show as they arrive, not when a buffer fills.
    stream.write(text)
    stream.flush()
