"""JWT bearer tokens (PyJWT): verify the signature and claims, map them to a Principal.

Keys come from files read at start-up: ``auth.jwt_key_file`` holds a PEM public
key or certificate (RS*, PS*, ES*, EdDSA) or a shared secret of at least 32 bytes
(HS*), and ``auth.jwt_jwks_file`` a JWKS whose keys are chosen by the token's
``kid``. ``auth.jwt_algorithms`` is narrowed to the algorithms that fit each key,
so a public key can never be used as an HMAC secret. A JWKS file that changed on
disk is read again when a token names a kid it does not hold (at most every few
seconds), so keys rotate without a restart. Verified tokens are cached for
``auth.key_cache_ttl_s`` (bounded by ``auth.key_cache_size`` and by their own
``exp``): a key removed from the JWKS stops working within that time.

Every token must carry ``exp``, ``iss`` (equal to ``auth.jwt_issuer``) and ``aud``
(naming one of ``auth.jwt_audience``); ``exp`` and ``nbf`` are checked with
``auth.jwt_leeway_s`` of clock skew, after the signature::

    verifier = JWTVerifier(config)
    verifier.load()                                 # ConfigError on a bad setup
    principal = verifier.verify(token)              # UnauthenticatedError on a bad token

Errors tell the client only "invalid credentials", "expired credentials" or
"credentials not yet valid"; the precise reason goes to the server log.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from tokenwire.auth.config import AuthConfig, split_list
from tokenwire.auth.keys import make_principal
from tokenwire.auth.principal import Principal
from tokenwire.errors import ConfigError, InvalidArgumentError, UnauthenticatedError
from tokenwire.logs import get_logger

__all__ = ["JWKS_RELOAD_S", "JWTVerifier"]

_log = get_logger("tokenwire.auth")
_HMAC: Final = ("HS256", "HS384", "HS512")
_RSA: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_BY_CURVE: Final = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}
JWKS_RELOAD_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class _Key:
    """A verification key and the algorithms it may verify."""

    key: Any  # a cryptography public key, or the HMAC secret as bytes
    algorithms: tuple[str, ...]
    source: str  # for error messages and logs: the file, and the kid


class JWTVerifier:
    """Verifies JWT bearer tokens against the keys of an :class:`AuthConfig`."""

    def __init__(self, config: AuthConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._algorithms = split_list(config.jwt_algorithms)
        self._audience = split_list(config.jwt_audience)
        self._file_key: _Key | None = None
        self._jwks: dict[str | None, _Key] = {}
        self._jwks_mtime = 0.0
        self._jwks_checked = float("-inf")
        # token -> (principal, trusted until (clock), exp (unix seconds))
        self._verified: OrderedDict[str, tuple[Principal, float, float]] = OrderedDict()

    def load(self) -> None:
        """Read and check the key files and settings; ConfigError says what is wrong."""
        config = self._config
        known = jwt.algorithms.get_default_algorithms()
        unknown = [a for a in self._algorithms if a not in known or a == "none"]
        if unknown or not self._algorithms:
            raise ConfigError(
                f"auth.jwt_algorithms: unknown or empty {unknown or self._algorithms}; "
                f"e.g. 'RS256,ES256' or 'HS256'"
            )
        if not config.jwt_issuer:
            raise ConfigError("auth.jwt_issuer is required with JWTs, e.g. 'https://idp.example/'")
        if not self._audience:
            raise ConfigError("auth.jwt_audience is required with JWTs, e.g. 'tokenwire'")
        if config.jwt_key_file:
            self._file_key = self._load_key_file(config.jwt_key_file)
        if config.jwt_jwks_file:
            self._jwks = self._load_jwks(config.jwt_jwks_file)
        if self._file_key is None and not self._jwks:
            raise ConfigError("JWTs need auth.jwt_key_file or auth.jwt_jwks_file")

    def verify(self, token: str) -> Principal:
        """The principal a valid token names; UnauthenticatedError otherwise.

        A token that verified is remembered for ``auth.key_cache_ttl_s`` (never
        past its ``exp``), so a client reusing it costs a dictionary lookup.
        """
        hit = self._verified.get(token)
        if hit is not None:
            principal, until, expires = hit
            if self._clock() < until and time.time() < expires + self._config.jwt_leeway_s:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]
        claims = self._decode(token)
        principal = self._principal(claims)
        ttl, size = self._config.key_cache_ttl_s, self._config.key_cache_size
        if ttl > 0 and size > 0 and isinstance(claims.get("exp"), int | float):
            self._verified[token] = (principal, self._clock() + ttl, float(claims["exp"]))
            if len(self._verified) > size:
                self._verified.popitem(last=False)
        return principal

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            key = self._key_for(header.get("kid"))
            if key is None:
                raise jwt.InvalidKeyError("no key for this token's kid")
            claims = jwt.decode(
                token,
                key.key,
                algorithms=list(key.algorithms),
                audience=list(self._audience),
                issuer=self._config.jwt_issuer,
                leeway=self._config.jwt_leeway_s,
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise UnauthenticatedError("expired credentials") from None
        except jwt.ImmatureSignatureError:
            raise UnauthenticatedError("credentials not yet valid") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            _log.info("jwt refused", reason=type(exc).__name__, detail=str(exc)[:200])
            raise UnauthenticatedError("invalid credentials") from None
        return claims

    # --- claims -------------------------------------------------------------

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        config = self._config
        tenant = _claim(claims, config.jwt_tenant_claim) or config.jwt_default_tenant
        user = _claim(claims, config.jwt_user_claim)
        roles = _claim(claims, config.jwt_roles_claim) or ()
        plan = _claim(claims, config.jwt_plan_claim) or ""
        if isinstance(roles, str):
            roles = roles.split()
        try:
            if not (isinstance(tenant, str) and isinstance(user, str) and isinstance(plan, str)):
                raise InvalidArgumentError("tenant, user and plan claims must be strings")
            if not isinstance(roles, list | tuple) or not all(isinstance(r, str) for r in roles):
                raise InvalidArgumentError("roles claim must be a list or a string")
            return make_principal(tenant, user, roles, plan)
        except InvalidArgumentError as exc:
            _log.info("jwt refused", reason="claims", detail=exc.message)
            raise UnauthenticatedError("invalid credentials") from None

    # --- keys ---------------------------------------------------------------

    def _key_for(self, kid: object) -> _Key | None:
        if self._jwks:
            key = self._jwks.get(kid if isinstance(kid, str) else None)
            if key is None and kid is None and len(self._jwks) == 1 and self._file_key is None:
                key = next(iter(self._jwks.values()))
            if key is None and isinstance(kid, str) and self._reload_jwks():
                key = self._jwks.get(kid)
            if key is not None:
                return key
        return self._file_key

    def _reload_jwks(self) -> bool:
        """Re-read a changed JWKS file, at most every few seconds; whether it changed."""
        now = self._clock()
        if now - self._jwks_checked < JWKS_RELOAD_S:
            return False
        self._jwks_checked = now
        path = self._config.jwt_jwks_file
        try:
            if os.stat(path).st_mtime == self._jwks_mtime:
                return False
            self._jwks = self._load_jwks(path)
        except (OSError, ConfigError) as exc:
            _log.warning("jwks reload failed; keeping the keys loaded before", error=str(exc))
            return False
        _log.info("jwks reloaded", path=path, keys=len(self._jwks))
        return True

    def _load_key_file(self, path: str) -> _Key:
        data = _read(path, "auth.jwt_key_file")
        if b"-----BEGIN" not in data:
            return self._checked(data.strip(), _HMAC, f"{path} (shared secret)")
        try:
            public: Any = (
                x509.load_pem_x509_certificate(data).public_key()
                if b"CERTIFICATE-----" in data
                else serialization.load_pem_public_key(data)
            )
        except ValueError as exc:
            raise ConfigError(
                f"auth.jwt_key_file {path!r} must hold a PEM public key or certificate "
                f"(never a private key): {exc}"
            ) from None
        return self._checked(public, _family(public, path), path)

    def _load_jwks(self, path: str) -> dict[str | None, _Key]:
        self._jwks_mtime = os.stat(path).st_mtime if os.path.exists(path) else 0.0
        try:
            entries = json.loads(_read(path, "auth.jwt_jwks_file"))["keys"]
            if not isinstance(entries, list):
                raise TypeError("'keys' is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"auth.jwt_jwks_file {path!r} is not a JWKS: {exc}") from None
        keys: dict[str | None, _Key] = {}
        for entry in entries:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                jwk = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:
                _log.warning("jwks key skipped", path=path, kid=kid, error=str(exc))
                continue
            if jwk.algorithm_name not in self._algorithms:
                _log.warning("jwks key skipped", path=path, kid=kid, alg=jwk.algorithm_name)
                continue
            source = f"{path} kid={kid!r}"
            keys[kid if isinstance(kid, str) else None] = self._checked(
                jwk.key, (jwk.algorithm_name,), source
            )
        if not keys:
            raise ConfigError(
                f"auth.jwt_jwks_file {path!r} has no signing key for auth.jwt_algorithms "
                f"({', '.join(self._algorithms)})"
            )
        return keys

    def _checked(self, key: Any, family: tuple[str, ...], source: str) -> _Key:
        """Narrow the configured algorithms to ``family``; refuse keys too weak for them."""
        algorithms = tuple(a for a in self._algorithms if a in family)
        if not algorithms:
            raise ConfigError(
                f"{source} fits {', '.join(family)}, none of which auth.jwt_algorithms "
                f"({', '.join(self._algorithms)}) allows"
            )
        known = jwt.algorithms.get_default_algorithms()
        for name in algorithms:
            algorithm = known[name]
            problem = algorithm.check_key_length(algorithm.prepare_key(key))
            if problem:
                raise ConfigError(f"{source}: {problem}")
        return _Key(key=key, algorithms=algorithms, source=source)


def _family(public: Any, path: str) -> tuple[str, ...]:
    if isinstance(public, rsa.RSAPublicKey):
        return _RSA
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in _EC_BY_CURVE:
        return _EC_BY_CURVE[public.curve.name]
    if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise ConfigError(f"auth.jwt_key_file {path!r}: unsupported key type {type(public).__name__}")


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path!r}: {exc.strerror}") from None


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """``claims[name]``, or a nested claim by dotted path (``realm_access.roles``)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value
