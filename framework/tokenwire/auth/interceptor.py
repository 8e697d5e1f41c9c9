"""Authentication: who is calling, and may they call this method.

Runs once per call, before the handler, and never touches the response stream.
A call carries ``authorization: Bearer <credential>``: an API key (``tw_...``,
looked up by hash, cached for ``auth.key_cache_ttl_s``) or a JWT; without one,
and with ``auth.mtls`` on, a verified client certificate names the caller. The
principal goes to ``current_call().principal`` (this interceptor runs inside
:class:`~tokenwire.interceptors.ErrorsInterceptor`, which binds the call state).

Refusals say which kind of problem, never why a secret failed:
UNAUTHENTICATED "missing credentials", "invalid credentials", "expired
credentials", "credentials not yet valid"; PERMISSION_DENIED for a known caller
without the role a method needs (AdminService needs ``auth.admin_role``).
Methods in ``auth.open_methods`` (health checks, reflection) need nothing.

    auth = AuthInterceptor(config.auth, config.store.data_dir)
    await auth.start()               # opens the key store, loads JWT keys, bootstraps
    if auth.admin_key is not None:   # first start: show the new admin key once
        print(admin_key_notice(auth.admin_key, auth.admin_key_file))
"""

from __future__ import annotations

from typing import Any, Final

import grpc
import structlog

from tokenwire.auth.bootstrap import bootstrap_admin_key
from tokenwire.auth.config import AuthConfig, split_list
from tokenwire.auth.jwt import JWTVerifier
from tokenwire.auth.keys import (
    API_KEY_PREFIX,
    CachingKeyStore,
    IssuedKey,
    KeyStore,
    SQLiteKeyStore,
    hash_api_key,
    looks_like_api_key,
)
from tokenwire.auth.mtls import principal_from_auth_context
from tokenwire.auth.principal import ANONYMOUS, Principal
from tokenwire.context import Credential, current_call
from tokenwire.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from tokenwire.interceptors.base import CallInfo, Interceptor, Proceed
from tokenwire.logs import get_logger

__all__ = ["ADMIN_SERVICE", "AUTHORIZATION_HEADER", "AuthInterceptor"]

AUTHORIZATION_HEADER: Final = "authorization"
ADMIN_SERVICE: Final = "tokenwire.v1.AdminService"
_OPEN: Final = None  # a method that needs no credentials
_ANY_CALLER: Final = ""  # a method any authenticated caller may call
_log = get_logger("tokenwire.auth")
_MTLS: Final = Credential("mtls")


class AuthInterceptor(Interceptor):
    """Authenticates every call that is not open, and checks the method's role.

    ``key_store`` replaces the SQLite store the config names (the caller then
    opens and closes it); it is wrapped in a :class:`CachingKeyStore`, exposed
    as :attr:`key_store` for the AdminService, so revocations made there take
    effect at once.
    """

    authenticates = True

    def __init__(
        self, config: AuthConfig, data_dir: str, *, key_store: KeyStore | None = None
    ) -> None:
        self.config = config
        self._owns_store = key_store is None
        store = key_store or SQLiteKeyStore(config.resolved_keys_db(data_dir))
        self.key_store = CachingKeyStore(
            store, ttl_s=config.key_cache_ttl_s, max_size=config.key_cache_size
        )
        self.admin_key_file = config.resolved_admin_key_file(data_dir)
        self.admin_key: IssuedKey | None = None  # set by start() when it bootstraps
        self._data_dir = data_dir
        self._jwt = JWTVerifier(config) if config.enabled and config.jwt_enabled else None
        self._mtls_roles = split_list(config.mtls_roles)
        patterns = split_list(config.open_methods)
        self._open_exact = frozenset(p for p in patterns if not p.endswith("*"))
        self._open_prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
        self._method_roles = _parse_method_roles(config.method_roles)
        self._rules: dict[str, str | None] = {}  # method -> _OPEN, _ANY_CALLER or a role
        self._started = False

    @property
    def serves_keys(self) -> bool:
        """Whether API keys are on, so the server should add the AdminService."""
        return self.config.enabled and self.config.api_keys

    async def start(self) -> None:
        """Open the key store, load JWT keys, create the first admin key if needed."""
        config = self.config
        if self._started or not config.enabled:
            return
        if not (config.api_keys or self._jwt is not None or config.mtls):
            raise ConfigError(
                "auth.enabled needs a kind of credential: auth.api_keys, "
                "auth.jwt_key_file / auth.jwt_jwks_file, or auth.mtls"
            )
        if self._jwt is not None:
            self._jwt.load()
        if config.api_keys:
            await self.key_store.open()
            self.admin_key = await bootstrap_admin_key(self.key_store, config, self._data_dir)
            if self.admin_key is not None:
                key_id, path = self.admin_key.key.id, self.admin_key_file
                _log.warning("created the first admin key", key_id=key_id, file=path)
        self._started = True

    async def close(self) -> None:
        """Close the key store if this interceptor opened it."""
        if self._owns_store and self._started:
            await self.key_store.close()
        self._started = False

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        try:
            rule = self._rules[call.method]
        except KeyError:
            rule = self._rules[call.method] = self._rule_for(call.method)
        if rule is _OPEN:
            return await proceed(request, context)
        state = current_call()
        if self.config.enabled:
            principal, state.credential = await self._authenticate(context)
            structlog.contextvars.bind_contextvars(tenant=principal.tenant, user=principal.user)
        else:
            principal = ANONYMOUS  # said loudly at start: authentication is off
        state.principal = principal
        if rule and rule not in principal.roles:
            raise PermissionDeniedError(f"this method requires the {rule!r} role")
        return await proceed(request, context)

    def _rule_for(self, method: str) -> str | None:
        # Computed once per method name; the server knows a bounded set of them.
        if method in self._open_exact or method.startswith(self._open_prefixes):
            return _OPEN
        if method.startswith(f"/{ADMIN_SERVICE}/"):
            return self.config.admin_role
        for pattern, role in self._method_roles:
            if method == pattern or (pattern.endswith("*") and method.startswith(pattern[:-1])):
                return role
        return _ANY_CALLER

    async def recheck(self, credential: Credential) -> None:
        """Check a call's credential again (a long-lived stream, before each turn).

        Raises UNAUTHENTICATED once an API key is revoked (seen within
        ``auth.key_cache_ttl_s``) or a token has expired.
        """
        if credential.kind == "api_key":
            found = await self.key_store.lookup(credential.key_hash)
            if found is None or not found.active:
                raise UnauthenticatedError("invalid credentials: the API key was revoked")
        elif credential.kind == "jwt" and self._jwt is not None:
            self._jwt.verify(credential.token)

    async def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Principal, Credential]:
        headers = [v for k, v in context.invocation_metadata() or () if k == AUTHORIZATION_HEADER]
        if len(headers) > 1:
            raise UnauthenticatedError("invalid credentials: send one authorization header")
        header = headers[0] if headers else None
        if header is None:
            if self.config.mtls:
                principal = principal_from_auth_context(
                    context.auth_context(), roles=self._mtls_roles
                )
                if principal is not None:
                    return principal, _MTLS
            raise UnauthenticatedError(
                "missing credentials: send 'authorization: Bearer <API key or token>'"
            )
        scheme, _, token = str(header).partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("invalid credentials: expected 'Bearer <credential>'")
        if token.startswith(API_KEY_PREFIX):
            if not self.config.api_keys or not looks_like_api_key(token):
                raise UnauthenticatedError("invalid credentials")
            key_hash = hash_api_key(token)
            found = await self.key_store.lookup(key_hash)
            if found is None or not found.active:
                if found is not None:  # worth a line in the log: a revoked key still in use
                    _log.info("revoked api key refused", key_id=found.id)
                raise UnauthenticatedError("invalid credentials")
            return found.principal, Credential("api_key", key_hash=key_hash)
        if self._jwt is None:
            raise UnauthenticatedError("invalid credentials")
        return self._jwt.verify(token), Credential("jwt", token=token)


def _parse_method_roles(text: str) -> tuple[tuple[str, str], ...]:
    rules = []
    for item in split_list(text):
        method, sep, role = item.partition("=")
        if not sep or not method.strip().startswith("/") or not role.strip():
            raise ConfigError(
                f"auth.method_roles: {item!r} is not METHOD=ROLE, "
                "e.g. '/tokenwire.v1.ChatService/*=chat'"
            )
        rules.append((method.strip(), role.strip()))
    return tuple(rules)
