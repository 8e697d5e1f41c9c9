"""The ``tokenwire`` command: ``serve`` a model, ``chat`` with a server.

tokenwire serve                         # SmolLM2 on the CPU, 127.0.0.1:50051
tokenwire serve --listen 0.0.0.0:50051 --config tokenwire.toml
tokenwire chat "What is the capital of France?"
tokenwire chat                          # interactive; Ctrl-C cancels an answer
tokenwire worker --listen 0.0.0.0:50061 # an engine for gateways ([router] workers)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from tokenwire import __version__
from tokenwire import client as chat_client
from tokenwire.auth.cli import add_keys_parser, run_keys
from tokenwire.config import Config, describe, load_config
from tokenwire.errors import ConfigError
from tokenwire.logs import configure_logging

__all__ = ["build_parser", "main"]


def _add_common(p: Any, section: str, example: str) -> None:
    """The flags ``serve`` and ``worker`` share; ``section`` holds their listen address."""
    p.add_argument(
        "--config", metavar="FILE", help=f"TOML config file ([{section}], [backend], ...)"
    )
    p.add_argument("--listen", metavar="HOST:PORT", help=f"address to listen on ({section}.listen)")
    p.add_argument("--backend", help="backend entry point name (backend.name)")
    p.add_argument("--model-path", help="model file or directory (backend.model_path)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (backend.device)")
    p.add_argument("--log-format", choices=("console", "json"), help="logging.format")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=f"any setting, e.g. --set {example} (repeatable)",
    )


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC (embedded defaults: SmolLM2 on CPU)")
    _add_common(p, "server", "limits.default_max_tokens=256")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="gateway processes sharing the port (SO_REUSEPORT); share state through "
        "PostgreSQL and Redis",
    )
    p.add_argument("--help-config", action="store_true", help="list every setting and exit")


def _add_worker(sub: Any) -> None:
    p = sub.add_parser(
        "worker", help="host one engine for gateways, over the VllmEngine gRPC protocol"
    )
    _add_common(p, "worker", "worker.token_file=/etc/token")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tokenwire`` command."""
    parser = argparse.ArgumentParser(prog="tokenwire", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tokenwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_worker(sub)
    chat = sub.add_parser("chat", help="chat with a running server")
    chat_client.add_arguments(chat)
    add_keys_parser(sub)
    return parser


def _load(args: argparse.Namespace, listen_key: str) -> Config:
    """The configuration with the command's flags and ``--set`` applied on top."""
    config = load_config(args.config, overrides=_overrides(args, listen_key))
    configure_logging(config.logging)
    return config


def _overrides(args: argparse.Namespace, listen_key: str) -> dict[str, str]:
    """The command's flags and ``--set`` pairs as ``section.field`` overrides."""
    overrides: dict[str, str] = {}
    for flag, key in (
        ("listen", listen_key),
        ("backend", "backend.name"),
        ("model_path", "backend.model_path"),
        ("device", "backend.device"),
        ("log_format", "logging.format"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = value
    return overrides


def _serve(args: argparse.Namespace) -> int:
    if args.help_config:
        print(describe())
        return 0
    if args.processes != 1:
        from tokenwire.processes import serve_processes  # heavy: grpc servers, stores

        asyncio.run(serve_processes(args.config, _overrides(args, "server.listen"), args.processes))
        return 0
    config = _load(args, "server.listen")
    from tokenwire.server import TokenwireServer  # heavy: grpc servers, stores

    server = TokenwireServer(config)
    asyncio.run(server.serve())
    return 0


def _worker(args: argparse.Namespace) -> int:
    config = _load(args, "worker.listen")
    from tokenwire.worker.server import WorkerServer  # heavy: grpc, the engine

    asyncio.run(WorkerServer(config).serve())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokenwire`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "worker":
            return _worker(args)
        if args.command == "keys":
            return run_keys(args)
        return chat_client.main(args)
    except ConfigError as exc:
        print(f"tokenwire: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
