"""The ``tokenwire chat`` command line: its arguments, and :func:`main`.

With a question, :func:`main` asks it once (:mod:`tokenwire.client.oneshot`);
without one, it opens an interactive session (:mod:`tokenwire.client.session`),
where Ctrl-C while an answer streams cancels that turn and Ctrl-C or Ctrl-D at
the prompt quits::

    parser = argparse.ArgumentParser(prog="tokenwire chat")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import fields
from typing import Any

from tokenwire.client.oneshot import run_one_shot
from tokenwire.client.options import API_KEY_ENV, ChatOptions
from tokenwire.client.results import EXIT_INTERRUPTED, write_flushed
from tokenwire.client.session import run_interactive

__all__ = [
    "API_KEY_FILE_ENV",
    "DEFAULT_API_KEY_FILE",
    "DEFAULT_TARGET",
    "TARGET_ENV",
    "add_arguments",
    "main",
]

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where the client looks for a server when neither flag nor environment says."""
TARGET_ENV = "TOKENWIRE_TARGET"
"""Environment variable that overrides :data:`DEFAULT_TARGET`."""
API_KEY_FILE_ENV = "TOKENWIRE_API_KEY_FILE"
"""Environment variable that overrides :data:`DEFAULT_API_KEY_FILE`."""
DEFAULT_API_KEY_FILE = ".tokenwire/admin.key"
"""Where the key is read from when none is given; ``tokenwire serve`` writes its first key there."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``tokenwire chat`` arguments to ``parser``.

    ::

        add_arguments(subparsers.add_parser("chat", help="chat with a server"))
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
        write_flushed(sys.stderr, "\n[interrupted]\n")
        return EXIT_INTERRUPTED
