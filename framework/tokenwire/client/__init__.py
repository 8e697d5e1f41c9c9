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

The coroutines work from code too::

    from tokenwire.client import ask

    result = await ask("127.0.0.1:50051", "Hi!", out=sys.stdout)

``command`` holds the command line, ``oneshot`` the one-shot question,
``session`` the interactive session, ``options`` how turns are asked, and
``results`` what a turn and a chat end with and how they are printed.
"""

from __future__ import annotations

from tokenwire.client.command import (
    API_KEY_FILE_ENV,
    DEFAULT_API_KEY_FILE,
    DEFAULT_TARGET,
    TARGET_ENV,
    add_arguments,
    main,
)
from tokenwire.client.oneshot import ask, run_one_shot
from tokenwire.client.options import API_KEY_ENV, ChatOptions
from tokenwire.client.results import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_INVALID_ARGUMENT,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    TurnResult,
    exit_code_for,
)
from tokenwire.client.session import ChatSession, LineReader, run_interactive

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
