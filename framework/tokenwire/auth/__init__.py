"""Authentication: API keys, JWT bearer tokens and mTLS client certificates.

The call-level half is :class:`tokenwire.auth.interceptor.AuthInterceptor`;
the AdminService that manages keys is :mod:`tokenwire.services.admin`; the ``tokenwire keys``
command is :mod:`tokenwire.auth.cli`.

    async with SQLiteKeyStore(AuthConfig().resolved_keys_db(".tokenwire")) as store:
        issued = await store.create_key(make_principal("acme", "alice", ["admin"]))
"""

from __future__ import annotations

from tokenwire.auth.bootstrap import admin_key_notice, bootstrap_admin_key, read_key_file
from tokenwire.auth.config import AuthConfig
from tokenwire.auth.keys import (
    ApiKey,
    CachingKeyStore,
    IssuedKey,
    KeyPage,
    KeyStore,
    SQLiteKeyStore,
    authenticate_api_key,
    generate_api_key,
    hash_api_key,
    make_principal,
)

__all__ = [
    "ApiKey",
    "AuthConfig",
    "CachingKeyStore",
    "IssuedKey",
    "KeyPage",
    "KeyStore",
    "SQLiteKeyStore",
    "admin_key_notice",
    "authenticate_api_key",
    "bootstrap_admin_key",
    "generate_api_key",
    "hash_api_key",
    "make_principal",
    "read_key_file",
]
