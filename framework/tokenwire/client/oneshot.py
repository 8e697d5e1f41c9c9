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
import os
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TextIO

import grpc

from tokenwire.client.options import (
    API_KEY_ENV,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_INVALID_ARGUMENT,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    ChatOptions,
    TurnResult,
    _report_failure,
    _report_finish,
    _write,
    exit_code_for,
)
from tokenwire.client.session import ChatSession, LineReader, run_interactive
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc

if TYPE_CHECKING:
    from tokenwire.proto.v1.chat_pb2_grpc import ChatServiceAsyncStub

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
API_KEY_FILE_ENV = "TOKENWIRE_API_KEY_FILE"
DEFAULT_API_KEY_FILE = ".tokenwire/admin.key"


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
