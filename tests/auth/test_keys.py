"""API keys: format, hash-only storage, lookup, listing, revocation and the lookup cache."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from tokenwire.auth import CachingKeyStore, IssuedKey, SQLiteKeyStore, make_principal
from tokenwire.auth.keys import MIGRATIONS, authenticate_api_key, hash_api_key, looks_like_api_key
from tokenwire.auth.principal import Principal
from tokenwire.errors import InvalidArgumentError, NotFoundError, UnauthenticatedError

ALICE = Principal("acme", "alice", frozenset({"reader"}), "pro")


def _all_bytes(directory: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(directory.iterdir()))


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_key_is_tw_and_43_url_safe_characters(alice_key: IssuedKey) -> None:
    """A new secret is tw_ plus 43 URL-safe characters; the listed prefix is its first 11."""
    assert alice_key.secret.startswith("tw_")
    assert 46 == len(alice_key.secret)
    assert looks_like_api_key(alice_key.secret)
    assert alice_key.secret[:11] == alice_key.key.prefix
    assert alice_key.secret not in repr(alice_key)


async def test_keys_are_stored_only_as_hashes(tmp_path: Path) -> None:
    """The SQLite file (and its WAL) holds the SHA-256 of the secret, never the secret."""
    path = tmp_path / "keys.db"
    async with SQLiteKeyStore(path) as store:
        issued = await store.create_key(ALICE)
        raw = _all_bytes(tmp_path)
        assert issued.secret.encode() not in raw
        assert issued.secret[11:].encode() not in raw  # not even the unlisted part
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT * FROM api_keys").fetchall()
    conn.close()
    assert [hashlib.sha256(issued.secret.encode()).digest()] == [
        value for value in rows[0] if isinstance(value, bytes)
    ]
    assert not any(issued.secret in str(value) for value in rows[0])


@pytest.mark.usefixtures("umask_022")
async def test_the_key_file_is_owner_only(tmp_path: Path) -> None:
    """The key database (and -wal, -shm) is 0600 in a new 0700 folder, at the latest schema."""
    path = tmp_path / "sub" / "keys.db"
    async with SQLiteKeyStore(path) as store:
        await store.create_key(ALICE)
        files = [path, path.with_name("keys.db-wal"), path.with_name("keys.db-shm")]
        assert ["0o600", "0o600", "0o600"] == [oct(stat.S_IMODE(f.stat().st_mode)) for f in files]
    assert "0o700" == oct(stat.S_IMODE(path.parent.stat().st_mode))
    with sqlite3.connect(path) as conn:
        assert len(MIGRATIONS) == conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()


async def test_lookup_is_one_indexed_query(key_store: SQLiteKeyStore) -> None:
    """Looking up a hash uses the unique index on key_hash, not a table scan."""
    with sqlite3.connect(":memory:") as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM api_keys WHERE key_hash = ?", (b"x",)
        ).fetchall()
    conn.close()
    assert "USING INDEX" in plan[0][3]


async def test_authenticate_returns_the_key_and_its_principal(
    key_store: SQLiteKeyStore, alice_key: IssuedKey
) -> None:
    """The secret authenticates as the principal it was created for."""
    key = await authenticate_api_key(key_store, alice_key.secret)
    assert alice_key.key == key
    assert ALICE == key.principal
    assert "alice's laptop" == key.description


@pytest.mark.parametrize(
    "secret", ["", "tw_short", "tw_" + "A" * 43, "xx_" + "A" * 43, "tw_" + "A" * 42 + "!"]
)
async def test_unknown_or_malformed_keys_are_invalid(
    key_store: SQLiteKeyStore, alice_key: IssuedKey, secret: str
) -> None:
    """A key that is malformed or unknown is 'invalid credentials', nothing more."""
    with pytest.raises(UnauthenticatedError) as raised:
        await authenticate_api_key(key_store, secret)
    assert "invalid credentials" == raised.value.message


async def test_a_revoked_key_is_invalid(key_store: SQLiteKeyStore, alice_key: IssuedKey) -> None:
    """After revocation the key no longer authenticates; revoking again keeps the first time."""
    before = time.time()
    revoked = await key_store.revoke_key(alice_key.key.id)
    assert revoked.revoked_at is not None
    assert before - 1 <= revoked.revoked_at <= time.time() + 1
    assert not revoked.active
    again = await key_store.revoke_key(alice_key.key.id)
    assert revoked.revoked_at == again.revoked_at
    with pytest.raises(UnauthenticatedError):
        await authenticate_api_key(key_store, alice_key.secret)


@pytest.mark.parametrize("key_id", ["key_0000000000000000", "nope", ""])
async def test_revoking_an_unknown_key_is_not_found(key_store: SQLiteKeyStore, key_id: str) -> None:
    """Revoking an id that does not exist is NotFoundError."""
    with pytest.raises(NotFoundError):
        await key_store.revoke_key(key_id)


async def test_listing_pages_newest_first_and_filters(key_store: SQLiteKeyStore) -> None:
    """Keys list newest first in pages; tenant and revoked filters apply."""
    made = [
        await key_store.create_key(make_principal(tenant, f"u{i}"))
        for i, tenant in enumerate(["a", "b", "a", "a", "b"])
    ]
    await key_store.revoke_key(made[3].key.id)
    first = await key_store.list_keys(page_size=2)
    second = await key_store.list_keys(page_size=2, page_token=first.next_page_token)
    assert ["u4", "u2"] == [k.principal.user for k in first.keys]
    assert ["u1", "u0"] == [k.principal.user for k in second.keys]
    assert "" == second.next_page_token
    everything = await key_store.list_keys(include_revoked=True, tenant="a")
    assert ["u3", "u2", "u0"] == [k.principal.user for k in everything.keys]
    with pytest.raises(InvalidArgumentError):
        await key_store.list_keys(page_token="garbage!")


@pytest.mark.parametrize(
    ("tenant", "user", "roles", "plan"),
    [
        ("", "alice", (), ""),
        ("a/b", "alice", (), ""),
        ("acme", "", (), ""),
        ("acme", "al\nice", (), ""),
        ("acme", "alice", ("has space",), ""),
        ("acme", "alice", ("",), ""),
        ("acme", "alice", (), "p" * 65),
    ],
)
def test_bad_principals_are_refused(
    tenant: str, user: str, roles: tuple[str, ...], plan: str
) -> None:
    """Tenants without '/', printable users, role tokens and short plans are required."""
    with pytest.raises(InvalidArgumentError):
        make_principal(tenant, user, roles, plan)


async def test_the_cache_serves_a_revoked_key_until_its_ttl(tmp_path: Path) -> None:
    """A key revoked by another process keeps working from the cache for at most ttl_s."""
    clock = FakeClock()
    path = tmp_path / "keys.db"
    async with SQLiteKeyStore(path) as other_process:
        cached = CachingKeyStore(SQLiteKeyStore(path), ttl_s=5.0, clock=clock)
        await cached.open()
        issued = await cached.create_key(ALICE)
        assert ALICE == (await authenticate_api_key(cached, issued.secret)).principal
        await other_process.revoke_key(issued.key.id)
        clock.now += 4.9
        assert ALICE == (await authenticate_api_key(cached, issued.secret)).principal
        clock.now += 0.2
        with pytest.raises(UnauthenticatedError):
            await authenticate_api_key(cached, issued.secret)
        await cached.close()


async def test_revoking_through_the_cache_acts_at_once(key_store: SQLiteKeyStore) -> None:
    """A revocation made through the caching store (the AdminService) is seen immediately."""
    cached = CachingKeyStore(key_store, ttl_s=60.0)
    issued = await cached.create_key(ALICE)
    await authenticate_api_key(cached, issued.secret)
    await cached.revoke_key(issued.key.id)
    with pytest.raises(UnauthenticatedError):
        await authenticate_api_key(cached, issued.secret)


async def test_the_cache_is_bounded(key_store: SQLiteKeyStore) -> None:
    """The cache keeps at most max_size keys, dropping the least recently used."""
    cached = CachingKeyStore(key_store, ttl_s=60.0, max_size=2)
    issued = [await cached.create_key(make_principal("t", f"u{i}")) for i in range(3)]
    for key in issued:
        await cached.lookup(hash_api_key(key.secret))
    await key_store.revoke_key(issued[0].key.id)  # behind the cache's back
    await key_store.revoke_key(issued[2].key.id)
    still_cached = await cached.lookup(hash_api_key(issued[2].secret))
    evicted = await cached.lookup(hash_api_key(issued[0].secret))
    assert (True, False) == (still_cached and still_cached.active, evicted and evicted.active)
