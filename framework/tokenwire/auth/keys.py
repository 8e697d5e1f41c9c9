"""API keys: random secrets, stored only as hashes, each bound to a principal.

A key is ``tw_`` followed by 43 URL-safe characters (256 random bits). The store
keeps its SHA-256 (enough for a secret of that entropy: nothing to brute-force,
so no slow hash is needed), the principal it authenticates, and a short prefix
that listings show so people can tell keys apart. The secret itself is shown
once, when the key is created, and never stored::

    async with SQLiteKeyStore("var/keys.db") as store:
        issued = await store.create_key(Principal("acme", "alice", frozenset({"admin"})))
        print(issued.secret)                 # the only time it is visible
        key = await authenticate_api_key(store, issued.secret)

Looking a key up is one indexed query. :class:`CachingKeyStore` keeps positive
lookups for ``ttl_s`` seconds (bounded in size), so authenticating a call costs a
dictionary lookup. Revocation through the same :class:`CachingKeyStore` (the
AdminService of the same process) takes effect at once; a key revoked from
another process (``tokenwire keys revoke``, another gateway) keeps working for at
most ``ttl_s`` seconds in gateways that had just used it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol, Self, runtime_checkable

from tokenwire.auth.principal import Principal
from tokenwire.errors import (
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from tokenwire.stores.sqlite_database import SQLiteDatabase, write_transaction

__all__ = [
    "API_KEY_PREFIX",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "MIGRATIONS",
    "ApiKey",
    "CachingKeyStore",
    "IssuedKey",
    "KeyPage",
    "KeyStore",
    "KeyStoreClosedError",
    "SQLiteKeyStore",
    "authenticate_api_key",
    "generate_api_key",
    "hash_api_key",
    "looks_like_api_key",
    "make_principal",
]

API_KEY_PREFIX: Final = "tw_"
_SECRET_BYTES: Final = 32  # 43 URL-safe characters
_SHOWN_CHARS: Final = 8  # of the secret, after "tw_", in listings: 48 of 256 bits
_API_KEY = re.compile(r"^tw_[A-Za-z0-9_-]{32,128}$")
_KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")
_ROLE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_MAX_TENANT, _MAX_USER, _MAX_PLAN, _MAX_DESCRIPTION, _MAX_ROLES = 128, 256, 64, 256, 32
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500


def generate_api_key() -> str:
    """A new secret: ``tw_`` + 43 URL-safe characters from :mod:`secrets`."""
    return API_KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def hash_api_key(secret: str) -> bytes:
    """The SHA-256 digest the store keeps instead of the secret."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def looks_like_api_key(token: str) -> bool:
    """Whether ``token`` has the shape of an API key (``tw_`` and 32+ URL-safe characters)."""
    return _API_KEY.match(token) is not None


def _printable(text: str) -> bool:
    return text.isprintable() and text == text.strip()


def make_principal(tenant: str, user: str, roles: Iterable[str] = (), plan: str = "") -> Principal:
    """A validated :class:`Principal`; InvalidArgumentError names the bad field.

    Tenants may not contain "/" (the conversation owner is ``tenant/user``), roles
    are short tokens without spaces, and no field may hold control characters.
    """
    if not tenant or len(tenant) > _MAX_TENANT or "/" in tenant or not _printable(tenant):
        raise InvalidArgumentError(
            f"tenant must be 1-{_MAX_TENANT} printable characters without '/'"
        )
    if not user or len(user) > _MAX_USER or not _printable(user):
        raise InvalidArgumentError(f"user must be 1-{_MAX_USER} printable characters")
    role_set = frozenset(roles)
    if len(role_set) > _MAX_ROLES or not all(_ROLE.match(role) for role in role_set):
        raise InvalidArgumentError(
            f"roles must be at most {_MAX_ROLES} names of letters, digits and ._:-"
        )
    plan = plan or "default"
    if len(plan) > _MAX_PLAN or not _printable(plan):
        raise InvalidArgumentError(f"plan must be at most {_MAX_PLAN} printable characters")
    return Principal(tenant=tenant, user=user, roles=role_set, plan=plan)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: everything but the secret."""

    id: str  # "key_3f9a0c2e4b1d7a65"
    prefix: str  # "tw_Ab3dE9fG": the start of the secret, to recognize it by
    principal: Principal
    description: str
    created_at: float  # unix seconds
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        """Whether the key still authenticates."""
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just created, with its secret: show ``secret`` once, then drop it."""

    key: ApiKey
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class KeyPage:
    """One page of :meth:`KeyStore.list_keys`, newest first."""

    keys: list[ApiKey]
    next_page_token: str  # empty on the last page


class KeyStoreClosedError(UnavailableError):
    """The key store is not open (or already closed)."""


@runtime_checkable
class KeyStore(Protocol):
    """Where API key hashes live. :class:`SQLiteKeyStore` is the embedded one."""

    async def open(self) -> None:
        """Connect and prepare; a second call is a no-op."""

    async def close(self) -> None:
        """Release the store; idempotent."""

    async def create_key(self, principal: Principal, *, description: str = "") -> IssuedKey:
        """Create a key for ``principal``; the result holds the secret, once."""

    async def lookup(self, secret_hash: bytes) -> ApiKey | None:
        """The key whose secret hashes to ``secret_hash``, revoked or not; None if none.

        Must be one indexed query: it runs whenever a key is not cached.
        """

    async def list_keys(
        self,
        *,
        tenant: str = "",
        include_revoked: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> KeyPage:
        """Keys newest first, ``page_size`` at most (capped at :data:`MAX_PAGE_SIZE`)."""

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key (again is harmless); NotFoundError if there is no such key."""

    async def bootstrap_key(
        self,
        principal: Principal,
        *,
        description: str,
        persist: Callable[[IssuedKey], None],
    ) -> IssuedKey | None:
        """If the store has never held a key, create one and return it; else None.

        ``persist`` runs before the key is committed (it writes the key file); if
        it raises, nothing is stored. Concurrent callers, even in other processes,
        create at most one key between them.
        """


async def authenticate_api_key(store: KeyStore, secret: str) -> ApiKey:
    """The active key for ``secret``; UnauthenticatedError("invalid credentials") otherwise."""
    if not looks_like_api_key(secret):
        raise UnauthenticatedError("invalid credentials")
    digest = hash_api_key(secret)
    key = await store.lookup(digest)
    if key is None or not key.active:
        raise UnauthenticatedError("invalid credentials")
    return key


class CachingKeyStore:
    """A :class:`KeyStore` that remembers active keys it looked up, for ``ttl_s`` seconds.

    Bounded to ``max_size`` entries (least recently used go first). Unknown and
    revoked keys are never cached. :meth:`revoke_key` drops the key from this
    cache at once; revocations made elsewhere are seen within ``ttl_s``.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        ttl_s: float = 5.0,
        max_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._ttl_s = ttl_s
        self._max_size = max_size
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[ApiKey, float]] = OrderedDict()

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        self._cache.clear()
        await self.store.close()

    async def create_key(self, principal: Principal, *, description: str = "") -> IssuedKey:
        return await self.store.create_key(principal, description=description)

    async def lookup(self, secret_hash: bytes) -> ApiKey | None:
        hit = self._cache.get(secret_hash)
        if hit is not None:
            if self._clock() < hit[1]:
                self._cache.move_to_end(secret_hash)
                return hit[0]
            del self._cache[secret_hash]
        key = await self.store.lookup(secret_hash)
        if key is not None and key.active and self._ttl_s > 0 and self._max_size > 0:
            self._cache[secret_hash] = (key, self._clock() + self._ttl_s)
            if len(self._cache) > self._max_size:
                self._cache.popitem(last=False)
        return key

    async def list_keys(
        self,
        *,
        tenant: str = "",
        include_revoked: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> KeyPage:
        return await self.store.list_keys(
            tenant=tenant,
            include_revoked=include_revoked,
            page_size=page_size,
            page_token=page_token,
        )

    async def revoke_key(self, key_id: str) -> ApiKey:
        key = await self.store.revoke_key(key_id)
        # Revocation is rare; a scan of the bounded cache is fine.
        for digest in [d for d, (cached, _) in self._cache.items() if cached.id == key_id]:
            del self._cache[digest]
        return key

    async def bootstrap_key(
        self,
        principal: Principal,
        *,
        description: str,
        persist: Callable[[IssuedKey], None],
    ) -> IssuedKey | None:
        return await self.store.bootstrap_key(principal, description=description, persist=persist)


MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: API keys. seq orders listings (newest first) and pages them.
    (
        """
        CREATE TABLE api_keys (
            seq          INTEGER PRIMARY KEY AUTOINCREMENT,
            id           TEXT NOT NULL UNIQUE,
            key_hash     BLOB NOT NULL UNIQUE,
            prefix       TEXT NOT NULL,
            tenant       TEXT NOT NULL,
            user         TEXT NOT NULL,
            roles        TEXT NOT NULL,
            plan         TEXT NOT NULL,
            description  TEXT NOT NULL,
            created_at   REAL NOT NULL,
            revoked_at   REAL
        )
        """,
        "CREATE INDEX api_keys_tenant_seq ON api_keys (tenant, seq)",
    ),
)
"""Schema migrations in order; migration ``n`` brings a file to ``user_version = n``.
Only ever append."""

_COLUMNS: Final = "id, prefix, tenant, user, roles, plan, description, created_at, revoked_at"


class SQLiteKeyStore:
    """A :class:`KeyStore` in one SQLite file, or ``":memory:"``.

    The file and its ``-wal``/``-shm`` companions are created with mode 0600, and
    missing parent directories with 0700 (see :mod:`tokenwire.stores.sqlite_database`).

    One connection on one worker thread, as in
    :class:`~tokenwire.stores.sqlite.SQLiteConversationStore`; WAL mode, so several
    gateway processes and the ``tokenwire keys`` command can share the file.

        async with SQLiteKeyStore(".tokenwire/keys.db") as store:
            page = await store.list_keys()
    """

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = SQLiteDatabase(
            path,
            migrations=MIGRATIONS,
            name="key",
            closed_error=KeyStoreClosedError,
            thread_name="tokenwire-keys",
        )
        self._clock = clock

    @property
    def path(self) -> str:
        """The database file, or ``":memory:"``."""
        return self._db.path

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def create_key(self, principal: Principal, *, description: str = "") -> IssuedKey:
        _check_description(description)
        issued = await self._db.run(self._create, principal, description, None)
        assert issued is not None  # only a bootstrap may decline
        return issued

    async def lookup(self, secret_hash: bytes) -> ApiKey | None:
        return await self._db.run(self._lookup, secret_hash)

    async def list_keys(
        self,
        *,
        tenant: str = "",
        include_revoked: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> KeyPage:
        if page_size < 0:
            raise InvalidArgumentError(f"page_size must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = _decode_page_token(page_token)
        return await self._db.run(self._list, tenant, include_revoked, size, before)

    async def revoke_key(self, key_id: str) -> ApiKey:
        if not _KEY_ID.match(key_id):
            raise NotFoundError(f"no API key {key_id!r}")
        return await self._db.run(self._revoke, key_id)

    async def bootstrap_key(
        self,
        principal: Principal,
        *,
        description: str,
        persist: Callable[[IssuedKey], None],
    ) -> IssuedKey | None:
        _check_description(description)
        return await self._db.run(self._create, principal, description, persist)

    # --- worker-thread side ------------------------------------------------

    def _create(
        self,
        conn: sqlite3.Connection,
        principal: Principal,
        description: str,
        persist: Callable[[IssuedKey], None] | None,
    ) -> IssuedKey | None:
        secret = generate_api_key()
        key = ApiKey(
            id=f"key_{secrets.token_hex(8)}",
            prefix=secret[: len(API_KEY_PREFIX) + _SHOWN_CHARS],
            principal=principal,
            description=description,
            created_at=self._clock(),
        )
        issued = IssuedKey(key=key, secret=secret)
        with write_transaction(conn):
            # Bootstrap: the write lock is held from this check to the commit,
            # so racing processes create one key between them.
            if persist is not None and conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone():
                return None
            conn.execute(
                "INSERT INTO api_keys (key_hash, id, prefix, tenant, user, roles, plan,"
                " description, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    hash_api_key(secret),
                    key.id,
                    key.prefix,
                    principal.tenant,
                    principal.user,
                    json.dumps(sorted(principal.roles)),
                    principal.plan,
                    description,
                    key.created_at,
                ),
            )
            if persist is not None:
                persist(issued)
        return issued

    def _lookup(self, conn: sqlite3.Connection, secret_hash: bytes) -> ApiKey | None:
        row = conn.execute(
            f"SELECT key_hash, {_COLUMNS} FROM api_keys WHERE key_hash = ?", (secret_hash,)
        ).fetchone()
        if row is None or not hmac.compare_digest(row[0], secret_hash):
            return None
        return _key_of(row[1:])

    def _list(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        include_revoked: bool,
        size: int,
        before: int | None,
    ) -> KeyPage:
        where = ["seq < ?"]
        params: list[object] = [before if before is not None else 2**63 - 1]
        if tenant:
            where.append("tenant = ?")
            params.append(tenant)
        if not include_revoked:
            where.append("revoked_at IS NULL")
        rows = conn.execute(
            f"SELECT seq, {_COLUMNS} FROM api_keys WHERE {' AND '.join(where)}"
            " ORDER BY seq DESC LIMIT ?",
            (*params, size + 1),
        ).fetchall()
        more = len(rows) > size
        rows = rows[:size]
        token = _encode_page_token(rows[-1][0]) if more else ""
        return KeyPage(keys=[_key_of(row[1:]) for row in rows], next_page_token=token)

    def _revoke(self, conn: sqlite3.Connection, key_id: str) -> ApiKey:
        with write_transaction(conn):
            conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), key_id),
            )
            row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
            found = row.fetchone()
        if found is None:
            raise NotFoundError(f"no API key {key_id!r}")
        return _key_of(found)


def _check_description(description: str) -> None:
    if len(description) > _MAX_DESCRIPTION or not description.isprintable():
        raise InvalidArgumentError(
            f"description must be at most {_MAX_DESCRIPTION} printable characters"
        )


def _key_of(row: Sequence[Any]) -> ApiKey:
    key_id, prefix, tenant, user, roles, plan, description, created_at, revoked_at = row
    return ApiKey(
        id=str(key_id),
        prefix=str(prefix),
        principal=Principal(
            tenant=str(tenant), user=str(user), roles=frozenset(json.loads(roles)), plan=str(plan)
        ),
        description=str(description),
        created_at=float(created_at),
        revoked_at=None if revoked_at is None else float(revoked_at),
    )


def _encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"k{seq}".encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> int | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if text.startswith("k") and text[1:].isdigit():
            return int(text[1:])
    except (binascii.Error, UnicodeDecodeError):
        pass
    raise InvalidArgumentError("page_token is not one this server returned")
