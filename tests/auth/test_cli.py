"""``tokenwire keys create|list|revoke`` on a temp data dir (sync tests: the CLI runs a loop)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from tokenwire.auth import ApiKey, SQLiteKeyStore, authenticate_api_key
from tokenwire.auth.cli import add_keys_parser, keys_db_path, run_keys
from tokenwire.errors import UnauthenticatedError


def keys(*argv: str) -> int:
    """Run ``tokenwire keys ARGV`` as the CLI would; its exit status."""
    parser = argparse.ArgumentParser(prog="tokenwire")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    return run_keys(parser.parse_args(["keys", *argv]))


def lookup(path: Path, secret: str) -> ApiKey:
    """Authenticate ``secret`` against the key store at ``path``."""

    async def run() -> ApiKey:
        async with SQLiteKeyStore(path) as store:
            return await authenticate_api_key(store, secret)

    return asyncio.run(run())


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp data dir the keys command finds through TOKENWIRE_STORE_DATA_DIR."""
    monkeypatch.setenv("TOKENWIRE_STORE_DATA_DIR", str(tmp_path))
    return tmp_path


def test_create_list_revoke(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """create prints the secret once; list shows the key without it; revoke disables it."""
    assert 0 == keys(
        "create", "--tenant", "acme", "--user", "alice", "--role", "admin", "--role", "ops",
        "--plan", "pro", "--description", "laptop",
    )  # fmt: skip
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith("tw_")
    assert "shown only once" in err
    key = lookup(data_dir / "keys.db", secret)
    assert ("acme", "alice", {"admin", "ops"}, "pro") == (
        key.principal.tenant, key.principal.user, set(key.principal.roles), key.principal.plan,
    )  # fmt: skip

    assert 0 == keys("list")
    listing = capsys.readouterr().out
    assert secret not in listing
    assert secret[11:20] not in listing
    lines = listing.splitlines()
    assert ["ID", "PREFIX", "TENANT", "USER", "ROLES"] == lines[0].split()[:5]
    assert [key.id, secret[:11] + "…", "acme", "alice", "admin,ops", "pro"] == lines[1].split()[:6]
    assert lines[1].endswith("active  laptop")

    assert 0 == keys("revoke", key.id)
    assert f"revoked {key.id} (acme/alice)\n" == capsys.readouterr().out
    with pytest.raises(UnauthenticatedError):
        lookup(data_dir / "keys.db", secret)
    assert 0 == keys("list")
    assert 1 == len(capsys.readouterr().out.splitlines())  # the header only
    assert 0 == keys("list", "--all")
    assert "revoked" in capsys.readouterr().out


def test_errors_exit_non_zero(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown key id exits 1, a bad principal 2, each with a message on stderr."""
    assert 1 == keys("revoke", "key_0123456789abcdef")
    assert "no API key 'key_0123456789abcdef'" in capsys.readouterr().err
    assert 2 == keys("create", "--tenant", "a/b", "--user", "x")
    assert "tenant must be" in capsys.readouterr().err


def test_keys_db_follows_the_server_config(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is keys.db in store.data_dir (env or --config); --keys-db overrides it."""
    parser = argparse.ArgumentParser()
    add_keys_parser(parser.add_subparsers())
    from_env = parser.parse_args(["keys", "list"])
    named = parser.parse_args(["keys", "list", "--keys-db", str(tmp_path / "x.db")])
    assert str(data_dir / "keys.db") == keys_db_path(from_env)
    assert str(tmp_path / "x.db") == keys_db_path(named)
    monkeypatch.delenv("TOKENWIRE_STORE_DATA_DIR")
    toml = tmp_path / "tokenwire.toml"
    toml.write_text(f'[store]\ndata_dir = "{tmp_path / "srv"}"\n')
    from_file = parser.parse_args(["keys", "revoke", "key_0123456789abcdef", "--config", str(toml)])
    assert str(tmp_path / "srv" / "keys.db") == keys_db_path(from_file)
