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

from dataclasses import dataclass
from pathlib import Path

from tokenwire.config_fields import setting

__all__ = ["AuthConfig", "split_list"]


def split_list(value: str) -> tuple[str, ...]:
    """``"a, b,,c"`` → ``("a", "b", "c")``."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Authentication: API keys, JWT bearer tokens, mTLS client certificates."""

    enabled: bool = setting(
        True, "require credentials on every RPC but open_methods; false: every caller is anonymous"
    )
    api_keys: bool = setting(True, "accept API keys ('authorization: Bearer tw_...')")
    keys_db: str = setting("", "SQLite file of API key hashes; empty: keys.db in store.data_dir")
    key_cache_ttl_s: float = setting(
        5.0,
        "seconds a looked-up key is trusted without asking the store again; a key revoked "
        "from another process keeps working at most this long (0: ask every call)",
    )
    key_cache_size: int = setting(10_000, "most keys held in the lookup cache")
    bootstrap_admin_key: bool = setting(
        True, "on first start with an empty key store, create an admin key and print it once"
    )
    admin_key_file: str = setting(
        "", "where the bootstrap admin key is written (mode 0600); empty: admin.key in data_dir"
    )
    admin_role: str = setting("admin", "role required to call AdminService")
    method_roles: str = setting(
        "",
        "comma-separated METHOD=ROLE rules: callers of METHOD need ROLE (a trailing * in "
        "METHOD matches a prefix), e.g. '/tokenwire.v1.ChatService/*=chat'",
    )
    open_methods: str = setting(
        "/grpc.health.v1.Health/*,/grpc.reflection.*",
        "comma-separated methods callable without credentials; a trailing * matches a prefix",
    )
    jwt_algorithms: str = setting(
        "HS256,RS256,ES256",
        "comma-separated JWT algorithms accepted; narrowed to those that fit the configured key",
    )
    jwt_key_file: str = setting(
        "",
        "JWT verification key: a PEM public key (RS*/ES*) or a shared secret of 32+ bytes "
        "(HS*); empty: no key file",
    )
    jwt_jwks_file: str = setting(
        "", "JWKS JSON file of JWT public keys, chosen by the token's kid; empty: none"
    )
    jwt_issuer: str = setting("", "required 'iss' of JWTs (required when JWTs are on)")
    jwt_audience: str = setting(
        "", "comma-separated audiences; a JWT's 'aud' must name one (required when JWTs are on)"
    )
    jwt_leeway_s: float = setting(30.0, "clock skew allowed when checking exp and nbf, in seconds")
    jwt_tenant_claim: str = setting("tenant", "JWT claim holding the caller's tenant")
    jwt_user_claim: str = setting("sub", "JWT claim holding the caller's user name")
    jwt_roles_claim: str = setting(
        "roles", "JWT claim holding roles: a list or a space-separated string"
    )
    jwt_plan_claim: str = setting("plan", "JWT claim holding the quota plan (absent: 'default')")
    jwt_default_tenant: str = setting(
        "", "tenant for JWTs without the tenant claim; empty: such tokens are refused"
    )
    mtls: bool = setting(
        False,
        "without a bearer token, take the caller from the verified client certificate "
        "(CN → user, O → tenant); needs a TLS listener that requires client certificates",
    )
    mtls_roles: str = setting(
        "", "comma-separated roles given to certificate-authenticated callers"
    )

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
