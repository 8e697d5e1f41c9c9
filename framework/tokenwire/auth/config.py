"""The ``[auth]`` section: who may call, and how they prove it.

Secure by default: every RPC but health checks and reflection needs an API key,
and the first start creates an admin key (printed once, saved with mode 0600)::

    [auth]
    jwt_jwks_file = "/etc/tokenwire/jwks.json"
    jwt_issuer = "https://login.example.com/"
    jwt_audience = "tokenwire"

List-valued settings are comma-separated strings, so they work unchanged as
``TOKENWIRE_AUTH_*`` environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AuthConfig", "split_list"]


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def split_list(value: str) -> tuple[str, ...]:
    """``"a, b,,c"`` → ``("a", "b", "c")``."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Authentication: API keys, JWT bearer tokens, mTLS client certificates."""

    enabled: bool = _field(
        True, "require credentials on every RPC but open_methods; false: every caller is anonymous"
    )
    api_keys: bool = _field(True, "accept API keys ('authorization: Bearer tw_...')")
    keys_db: str = _field("", "SQLite file of API key hashes; empty: keys.db in store.data_dir")
    key_cache_ttl_s: float = _field(
        5.0,
        "seconds a looked-up key is trusted without asking the store again; a key revoked "
        "from another process keeps working at most this long (0: ask every call)",
    )
    key_cache_size: int = _field(10_000, "most keys held in the lookup cache")
    bootstrap_admin_key: bool = _field(
        True, "on first start with an empty key store, create an admin key and print it once"
    )
    admin_key_file: str = _field(
        "", "where the bootstrap admin key is written (mode 0600); empty: admin.key in data_dir"
    )
    admin_role: str = _field("admin", "role required to call AdminService")
    method_roles: str = _field(
        "",
        "comma-separated METHOD=ROLE rules: callers of METHOD need ROLE (a trailing * in "
        "METHOD matches a prefix), e.g. '/tokenwire.v1.ChatService/*=chat'",
    )
    open_methods: str = _field(
        "/grpc.health.v1.Health/*,/grpc.reflection.*",
        "comma-separated methods callable without credentials; a trailing * matches a prefix",
    )
    jwt_algorithms: str = _field(
        "HS256,RS256,ES256",
        "comma-separated JWT algorithms accepted; narrowed to those that fit the configured key",
    )
    jwt_key_file: str = _field(
        "",
        "JWT verification key: a PEM public key (RS*/ES*) or a shared secret of 32+ bytes "
        "(HS*); empty: no key file",
    )
    jwt_jwks_file: str = _field(
        "", "JWKS JSON file of JWT public keys, chosen by the token's kid; empty: none"
    )
    jwt_issuer: str = _field("", "required 'iss' of JWTs (required when JWTs are on)")
    jwt_audience: str = _field(
        "", "comma-separated audiences; a JWT's 'aud' must name one (required when JWTs are on)"
    )
    jwt_leeway_s: float = _field(30.0, "clock skew allowed when checking exp and nbf, in seconds")
    jwt_tenant_claim: str = _field("tenant", "JWT claim holding the caller's tenant")
    jwt_user_claim: str = _field("sub", "JWT claim holding the caller's user name")
    jwt_roles_claim: str = _field(
        "roles", "JWT claim holding roles: a list or a space-separated string"
    )
    jwt_plan_claim: str = _field("plan", "JWT claim holding the quota plan (absent: 'default')")
    jwt_default_tenant: str = _field(
        "", "tenant for JWTs without the tenant claim; empty: such tokens are refused"
    )
    mtls: bool = _field(
        False,
        "without a bearer token, take the caller from the verified client certificate "
        "(CN → user, O → tenant); needs a TLS listener that requires client certificates",
    )
    mtls_roles: str = _field("", "comma-separated roles given to certificate-authenticated callers")

    @property
    def jwt_enabled(self) -> bool:
        """Whether JWT bearer tokens are accepted (a key or JWKS file is configured)."""
        return bool(self.jwt_key_file or self.jwt_jwks_file)

    def resolved_keys_db(self, data_dir: str) -> str:
        """The key store file to open."""
        return self.keys_db or str(Path(data_dir) / "keys.db")

    def resolved_admin_key_file(self, data_dir: str) -> str:
        """Where the bootstrap admin key goes."""
        return self.admin_key_file or str(Path(data_dir) / "admin.key")
