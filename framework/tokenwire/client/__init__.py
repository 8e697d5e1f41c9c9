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
"""

from __future__ import annotations

from tokenwire.client.oneshot import (
    API_KEY_ENV,
    API_KEY_FILE_ENV,
    DEFAULT_API_KEY_FILE,
    DEFAULT_TARGET,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_INVALID_ARGUMENT,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    TARGET_ENV,
    ChatOptions,
    ChatSession,
    LineReader,
    TurnResult,
    add_arguments,
    ask,
    exit_code_for,
    main,
    run_interactive,
    run_one_shot,
)

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
