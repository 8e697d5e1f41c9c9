"""The first start creates one admin key, saved with mode 0600; later starts create none."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from tests.auth.conftest import auth_config, bearer, running_auth_server
from tokenwire.auth import SQLiteKeyStore, bootstrap_admin_key, read_key_file
from tokenwire.auth.bootstrap import admin_key_notice, write_key_file
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.proto.v1 import admin_pb2


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_the_first_start_creates_one_admin_key(tmp_path: Path) -> None:
    """Start 1 writes admin.key (0600) holding a working admin key; start 2 creates nothing."""
    config = auth_config(bootstrap_admin_key=True)
    first = AuthInterceptor(config, str(tmp_path))
    async with running_auth_server(first) as server:
        issued = first.admin_key
        assert issued is not None
        key_file = tmp_path / "admin.key"
        assert first.admin_key_file == str(key_file)
        assert issued.secret == read_key_file(key_file)
        assert 0o600 == stat.S_IMODE(key_file.stat().st_mode)
        listed = await server.admin.ListApiKeys(
            admin_pb2.ListApiKeysRequest(), metadata=bearer(issued.secret)
        )
    assert [("default", "admin", ["admin"])] == [
        (k.tenant, k.user, list(k.roles)) for k in listed.keys
    ]
    assert ["admin.key", "keys.db"] == _files(tmp_path)  # no temp file left behind

    key_file.unlink()  # even without its file, a store that held a key is not re-bootstrapped
    second = AuthInterceptor(config, str(tmp_path))
    await second.start()
    await second.close()
    assert None is second.admin_key
    assert not key_file.exists()
    async with SQLiteKeyStore(tmp_path / "keys.db") as store:
        assert 1 == len((await store.list_keys(include_revoked=True)).keys)


async def test_racing_starts_create_one_key(tmp_path: Path) -> None:
    """Gateways starting together on one data dir create exactly one admin key between them."""
    config = auth_config(bootstrap_admin_key=True)
    stores = [SQLiteKeyStore(tmp_path / "keys.db") for _ in range(4)]
    for store in stores:
        await store.open()
    results = await asyncio.gather(
        *(bootstrap_admin_key(store, config, str(tmp_path)) for store in stores)
    )
    created = [r for r in results if r is not None]
    page = await stores[0].list_keys()
    for store in stores:
        await store.close()
    assert 1 == len(created)
    assert [created[0].key.id] == [k.id for k in page.keys]
    assert created[0].secret == read_key_file(tmp_path / "admin.key")


async def test_a_failed_key_file_write_stores_no_key(tmp_path: Path) -> None:
    """If the key file cannot be written, no key is stored, so the next start tries again."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = auth_config(bootstrap_admin_key=True, admin_key_file=str(blocker / "admin.key"))
    async with SQLiteKeyStore(":memory:") as store:
        with pytest.raises(FileExistsError):
            await bootstrap_admin_key(store, config, str(tmp_path))
        assert [] == (await store.list_keys(include_revoked=True)).keys


async def test_bootstrap_can_be_turned_off(tmp_path: Path) -> None:
    """With auth.bootstrap_admin_key off, an empty store stays empty and no file is written."""
    auth = AuthInterceptor(auth_config(bootstrap_admin_key=False), str(tmp_path))
    await auth.start()
    await auth.close()
    assert None is auth.admin_key
    assert not (tmp_path / "admin.key").exists()


async def test_the_notice_shows_the_key_and_where_it_is_saved(tmp_path: Path) -> None:
    """The one-time notice names the key, its id and its file."""
    async with SQLiteKeyStore(":memory:") as store:
        issued = await bootstrap_admin_key(
            store, auth_config(bootstrap_admin_key=True), str(tmp_path)
        )
    assert issued is not None
    notice = admin_key_notice(issued, tmp_path / "admin.key")
    assert issued.secret in notice
    assert issued.key.id in notice
    assert str(tmp_path / "admin.key") in notice


def test_a_missing_key_folder_is_created_private(tmp_path: Path) -> None:
    """Under umask 022, the key file's new folders are 0700 and the file 0600."""
    key_file = tmp_path / "secrets" / "gateway" / "admin.key"
    previous = os.umask(0o022)
    try:
        write_key_file(key_file, "tw_" + "k" * 43)
    finally:
        os.umask(previous)
    paths = (key_file.parent.parent, key_file.parent, key_file)
    assert ["0o700", "0o700", "0o600"] == [oct(stat.S_IMODE(p.stat().st_mode)) for p in paths]
    assert "tw_" + "k" * 43 == read_key_file(key_file)
