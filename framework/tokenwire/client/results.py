"""What a chat turn and a chat end with, and how the client prints them.

A finished turn's :class:`TurnResult`, the exit codes ``tokenwire chat`` ends
with, and the notes and errors written to stderr; the one-shot question and the
interactive session both report through these::

    exit_code_for(grpc.StatusCode.UNAVAILABLE)  # EXIT_UNAVAILABLE
    report_finish(sys.stderr, result, cancel_note=None, verbose=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

import grpc

from tokenwire.proto.v1 import chat_pb2

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID_ARGUMENT",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "TurnResult",
    "exit_code_for",
    "report_failure",
    "report_finish",
    "write_flushed",
]

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


def exit_code_for(code: grpc.StatusCode) -> int:
    """The process exit code for a gRPC status that ended the chat.

    >>> exit_code_for(grpc.StatusCode.UNAVAILABLE)
    3
    """
    return _EXIT_CODES.get(code, EXIT_FAILURE)


def report_finish(
    err: TextIO, result: TurnResult, *, cancel_note: str | None, verbose: bool
) -> None:
    """Note on ``err`` why a turn stopped, unless it simply ended; with ``verbose``, its usage.

    A cancelled turn is noted with ``cancel_note`` (what asked for the cancel)
    when there is one::

        report_finish(sys.stderr, result, cancel_note="[cancelled]", verbose=False)
    """
    reason = result.finish_reason
    if reason == chat_pb2.FINISH_REASON_CANCELLED and cancel_note is not None:
        write_flushed(err, cancel_note + "\n")
    elif reason != chat_pb2.FINISH_REASON_STOP:
        write_flushed(err, _FINISH_NOTES.get(reason, f"[stopped: finish reason {reason}]") + "\n")
    if verbose:
        usage = result.usage
        write_flushed(
            err,
            f"[conversation {result.conversation_id}, turn {result.turn_id}, "
            f"model {result.model or '?'}: {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} completion tokens, "
            f"first token after {usage.time_to_first_token_ms:.0f} ms]\n",
        )


def report_failure(err: TextIO, code: grpc.StatusCode | None, details: str, target: str) -> None:
    """Print ``error: <CODE>: <details>`` on ``err``; for UNAVAILABLE, how to start a server.

    ``code`` is ``None`` for a failure without a status, such as a server that
    closed the stream in the middle of a turn::

        report_failure(sys.stderr, error.code(), error.details() or "", "127.0.0.1:50051")
    """
    if code is None:
        write_flushed(err, f"error: {details}\n")
        return
    write_flushed(err, f"error: {code.name}: {details}\n" if details else f"error: {code.name}\n")
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {target}" if target else ""
        write_flushed(err, f"is the server running{where}? Start one with: tokenwire serve\n")


def write_flushed(stream: TextIO, text: str) -> None:
    """Write ``text`` and flush at once, so tokens show as they arrive, not when a buffer fills."""
    stream.write(text)
    stream.flush()
