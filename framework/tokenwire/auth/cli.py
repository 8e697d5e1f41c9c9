"""``tokenwire keys``: create, list and revoke API keys in the server's key store.

tokenwire keys create --tenant acme --user alice --role admin --description "laptop"
tokenwire keys list [--tenant acme] [--all]
tokenwire keys revoke key_3f9a0c2e4b1d7a65 [--config tokenwire.toml | --keys-db PATH]

The store is the server's (``keys.db`` in ``store.data_dir``, from ``--config`` and
``TOKENWIRE_*``), or ``--keys-db``. ``create`` prints the secret alone on stdout,
once (``KEY=$(tokenwire keys create ...)``), and what it made on stderr. Running
gateways notice a revocation within their key cache TTL (``auth.key_cache_ttl_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from tokenwire.auth.config import AuthConfig
from tokenwire.auth.keys import ApiKey, SQLiteKeyStore, make_principal
from tokenwire.errors import InvalidArgumentError, NotFoundError, TokenwireError

__all__ = ["add_keys_parser", "keys_db_path", "run_keys"]


def add_keys_parser(subparsers: Any) -> None:
    """Add ``keys create|list|revoke`` to the ``tokenwire`` command's subparsers."""
    keys = subparsers.add_parser(
        "keys", help="create, list and revoke API keys in the server's key store"
    )
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--config", metavar="FILE", help="the server's TOML config file")
    store.add_argument(
        "--keys-db", metavar="PATH", help="key store file (default: keys.db in store.data_dir)"
    )
    sub = keys.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser(
        "create", parents=[store], help="create a key and print its secret, once"
    )
    create.add_argument("--tenant", required=True, help="the caller's tenant")
    create.add_argument("--user", required=True, help="the caller's user name")
    create.add_argument(
        "--role", action="append", default=[], dest="roles", help="a role, e.g. admin (repeatable)"
    )
    create.add_argument("--plan", default="", help="quota plan (default: 'default')")
    create.add_argument("--description", default="", help="free text to recognize the key by")
    listing = sub.add_parser(
        "list", parents=[store], help="list keys, newest first (never their secrets)"
    )
    listing.add_argument("--tenant", default="", help="only this tenant's keys")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = sub.add_parser("revoke", parents=[store], help="revoke a key by id")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id, e.g. key_3f9a0c2e4b1d7a65")


def keys_db_path(args: argparse.Namespace) -> str:
    """The key store file: ``--keys-db``, else the one the server's config names."""
    if args.keys_db:
        return str(args.keys_db)
    from tokenwire.config import load_config  # reads TOKENWIRE_* and --config

    config = load_config(args.config)
    auth = getattr(config, "auth", None)
    if not isinstance(auth, AuthConfig):
        auth = AuthConfig()
    return auth.resolved_keys_db(config.store.data_dir)


def run_keys(args: argparse.Namespace) -> int:
    """Run ``tokenwire keys ...``; returns the exit status (1 not found, 2 bad input)."""
    try:
        return asyncio.run(_run(args, keys_db_path(args)))
    except NotFoundError as exc:
        print(f"tokenwire keys: {exc.message}", file=sys.stderr)
        return 1
    except TokenwireError as exc:
        print(f"tokenwire keys: {exc.message}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, path: str) -> int:
    async with SQLiteKeyStore(path) as store:
        if args.keys_command == "create":
            principal = make_principal(args.tenant, args.user, args.roles, args.plan)
            issued = await store.create_key(principal, description=args.description)
            print(issued.secret)
            print(
                f"created {issued.key.id} for {principal.owner}; the key above is shown only once",
                file=sys.stderr,
            )
            return 0
        if args.keys_command == "list":
            keys: list[ApiKey] = []
            token = ""
            while True:
                page = await store.list_keys(
                    tenant=args.tenant, include_revoked=args.all, page_size=500, page_token=token
                )
                keys.extend(page.keys)
                token = page.next_page_token
                if not token:
                    break
            print(_table(keys))
            return 0
        if args.keys_command == "revoke":
            key = await store.revoke_key(args.key_id)
            print(f"revoked {key.id} ({key.principal.owner})")
            return 0
    raise InvalidArgumentError(f"unknown keys command {args.keys_command!r}")


def _table(keys: list[ApiKey]) -> str:
    header = ("ID", "PREFIX", "TENANT", "USER", "ROLES", "PLAN", "CREATED", "STATE", "DESCRIPTION")
    rows = [header] + [
        (
            key.id,
            key.prefix + "…",
            key.principal.tenant,
            key.principal.user,
            ",".join(sorted(key.principal.roles)) or "-",
            key.principal.plan,
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(key.created_at)),
            "active" if key.active else "revoked",
            key.description,
        )
        for key in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]
        ).rstrip()
        for row in rows
    )
