"""JWT verification: key files, algorithm narrowing, claims mapping, JWKS rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.auth.conftest import (
    AUDIENCE,
    HS_SECRET,
    ISSUER,
    SigningKeys,
    auth_config,
    make_token,
    write_jwks,
)
from tokenwire.auth.jwt import JWKS_RELOAD_S, JWTVerifier
from tokenwire.auth.principal import Principal
from tokenwire.errors import ConfigError, UnauthenticatedError


def verifier(**fields: Any) -> JWTVerifier:
    """A loaded verifier for ISSUER and AUDIENCE with ``fields`` on top."""
    config = auth_config(jwt_issuer=ISSUER, jwt_audience=AUDIENCE, **fields)
    loaded = JWTVerifier(config)
    loaded.load()
    return loaded


def refusal(verify: JWTVerifier, token: str) -> str:
    """The message a refused token gets."""
    with pytest.raises(UnauthenticatedError) as raised:
        verify.verify(token)
    return raised.value.message


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"jwt_issuer": ""}, "jwt_issuer is required"),
        ({"jwt_audience": ""}, "jwt_audience is required"),
        ({"jwt_algorithms": "HS256,XX999"}, "unknown"),
        ({"jwt_algorithms": "none"}, "unknown"),
        ({"jwt_key_file": "/nonexistent/key.pem"}, "cannot read"),
    ],
)
def test_bad_settings_fail_at_start(
    signing_keys: SigningKeys, fields: dict[str, str], complaint: str
) -> None:
    """Missing issuer or audience, unknown algorithms and unreadable files are ConfigErrors."""
    base = {"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}
    config = auth_config(**base | {"jwt_key_file": str(signing_keys.rsa_public_pem)} | fields)
    with pytest.raises(ConfigError) as raised:
        JWTVerifier(config).load()
    assert complaint in raised.value.message


def test_a_short_hmac_secret_is_refused(tmp_path: Path) -> None:
    """An HS256 secret under 32 bytes is refused at start, not warned about per call."""
    (tmp_path / "short").write_bytes(b"too-short-secret")
    with pytest.raises(ConfigError) as raised:
        verifier(jwt_key_file=str(tmp_path / "short"))
    assert "HMAC key" in raised.value.message


def test_a_private_key_file_is_refused(tmp_path: Path) -> None:
    """A PEM private key given as the verification key is refused (it should not be there)."""
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "private.pem").write_bytes(pem)
    with pytest.raises(ConfigError) as raised:
        verifier(jwt_key_file=str(tmp_path / "private.pem"))
    assert "never a private key" in raised.value.message


def test_algorithms_must_fit_the_key(signing_keys: SigningKeys) -> None:
    """An RSA key with only HS256 allowed (or an EC key with only RS256) is a ConfigError."""
    with pytest.raises(ConfigError):
        verifier(jwt_key_file=str(signing_keys.rsa_public_pem), jwt_algorithms="HS256")
    with pytest.raises(ConfigError):
        verifier(jwt_key_file=str(signing_keys.ec_public_pem), jwt_algorithms="RS256")


def test_a_public_key_is_never_an_hmac_secret(signing_keys: SigningKeys) -> None:
    """A token 'signed' with HS256 using the public PEM as secret is refused (alg confusion)."""
    verify = verifier(jwt_key_file=str(signing_keys.rsa_public_pem))
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "tenant": "t", "exp": time.time() + 60}
    payload = _b64(json.dumps(claims).encode())
    secret = signing_keys.rsa_public_pem.read_bytes()
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert "invalid credentials" == refusal(verify, f"{header}.{payload}.{_b64(signature)}")


def test_claims_map_to_the_principal(signing_keys: SigningKeys) -> None:
    """Tenant, subject, roles (list or space-separated) and plan become the principal."""
    verify = verifier(jwt_key_file=str(signing_keys.hs_secret_file))
    as_list = make_token(HS_SECRET, "HS256", claims={"roles": ["a", "b"]})
    as_string = make_token(HS_SECRET, "HS256", claims={"roles": "a b"})
    bare = make_token(HS_SECRET, "HS256", drop=["roles", "plan"])
    expected = Principal("acme", "alice", frozenset({"a", "b"}), "pro")
    assert expected == verify.verify(as_list)
    assert expected == verify.verify(as_string)
    assert Principal("acme", "alice") == verify.verify(bare)


def test_claim_names_are_configurable(signing_keys: SigningKeys) -> None:
    """Claim names come from config; a dotted name reaches a nested claim (Keycloak style)."""
    verify = verifier(
        jwt_key_file=str(signing_keys.hs_secret_file),
        jwt_tenant_claim="org",
        jwt_user_claim="email",
        jwt_roles_claim="realm_access.roles",
        jwt_plan_claim="tier",
    )
    claims = {
        "org": "globex",
        "email": "hank@globex.test",
        "realm_access": {"roles": ["admin"]},
        "tier": "gold",
    }
    token = make_token(HS_SECRET, "HS256", claims=claims)
    expected = Principal("globex", "hank@globex.test", frozenset({"admin"}), "gold")
    assert expected == verify.verify(token)


def test_the_default_tenant_fills_a_missing_claim(signing_keys: SigningKeys) -> None:
    """Without a tenant claim a token is refused, unless jwt_default_tenant is set."""
    token = make_token(HS_SECRET, "HS256", drop=["tenant"])
    strict = verifier(jwt_key_file=str(signing_keys.hs_secret_file))
    lenient = verifier(jwt_key_file=str(signing_keys.hs_secret_file), jwt_default_tenant="corp")
    assert "invalid credentials" == refusal(strict, token)
    assert "corp" == lenient.verify(token).tenant


@pytest.mark.parametrize(
    "claims",
    [{"sub": None}, {"sub": 42}, {"tenant": "a/b"}, {"roles": [1, 2]}, {"roles": {"x": 1}}],
)
def test_malformed_claims_are_invalid(signing_keys: SigningKeys, claims: dict[str, Any]) -> None:
    """A correctly signed token with unusable claims is still invalid credentials."""
    verify = verifier(jwt_key_file=str(signing_keys.hs_secret_file))
    token = make_token(HS_SECRET, "HS256", claims=claims)
    assert "invalid credentials" == refusal(verify, token)


def test_leeway_allows_clock_skew(signing_keys: SigningKeys) -> None:
    """A token expired 10 s ago passes with 30 s of leeway and fails with none."""
    token = make_token(HS_SECRET, "HS256", expires_in=-10)
    lenient = verifier(jwt_key_file=str(signing_keys.hs_secret_file), jwt_leeway_s=30.0)
    strict = verifier(jwt_key_file=str(signing_keys.hs_secret_file), jwt_leeway_s=0.0)
    assert "alice" == lenient.verify(token).user
    assert "expired credentials" == refusal(strict, token)


def test_an_expired_token_with_a_bad_signature_is_just_invalid(signing_keys: SigningKeys) -> None:
    """Expiry is reported only for authentic tokens: the signature is checked first."""
    verify = verifier(jwt_key_file=str(signing_keys.hs_secret_file), jwt_leeway_s=0.0)
    forged = make_token(b"another-secret-of-at-least-32-bytes!!", "HS256", expires_in=-60)
    assert "invalid credentials" == refusal(verify, forged)


def test_a_single_key_jwks_serves_tokens_without_kid(tmp_path: Path) -> None:
    """With one key in the JWKS, a token without a kid is verified with it."""
    private = ec.generate_private_key(ec.SECP256R1())
    write_jwks(tmp_path / "jwks.json", only=private)
    verify = verifier(jwt_jwks_file=str(tmp_path / "jwks.json"))
    assert "alice" == verify.verify(make_token(private, "ES256")).user


def test_a_jwks_without_usable_keys_is_refused(tmp_path: Path) -> None:
    """A JWKS whose keys do not fit jwt_algorithms is a ConfigError."""
    write_jwks(tmp_path / "jwks.json", k=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError):
        verifier(jwt_jwks_file=str(tmp_path / "jwks.json"), jwt_algorithms="RS256")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError):
        verifier(jwt_jwks_file=str(tmp_path / "bad.json"))


def test_a_rotated_jwks_is_read_again_for_an_unknown_kid(tmp_path: Path) -> None:
    """A kid added to the JWKS file is picked up, at most once per reload interval."""
    path = tmp_path / "jwks.json"
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    write_jwks(path, old=old)
    now = [100.0]
    config = auth_config(jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_jwks_file=str(path))
    verify = JWTVerifier(config, clock=lambda: now[0])
    verify.load()
    token = make_token(new, "ES256", kid="new")
    assert "invalid credentials" == refusal(verify, token)  # checked the file: unchanged
    write_jwks(path, old=old, new=new)
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))
    assert "invalid credentials" == refusal(verify, token)  # too soon to look again
    now[0] += JWKS_RELOAD_S
    assert "alice" == verify.verify(token).user
    assert "alice" == verify.verify(make_token(old, "ES256", kid="old")).user


def test_none_of_the_details_reach_the_message(signing_keys: SigningKeys) -> None:
    """Audience, issuer and signature failures all read 'invalid credentials', nothing more."""
    verify = verifier(jwt_key_file=str(signing_keys.hs_secret_file))
    tokens = [
        make_token(HS_SECRET, "HS256", claims={"aud": "x"}),
        make_token(HS_SECRET, "HS256", claims={"iss": "x"}),
        make_token(b"z" * 40, "HS256"),
        make_token(HS_SECRET, "HS256", drop=["aud"]),
        make_token(HS_SECRET, "HS256", drop=["iss"]),
        jwt.encode({"sub": "x"}, b"s" * 64, algorithm="HS512"),
    ]
    assert ["invalid credentials"] * len(tokens) == [refusal(verify, t) for t in tokens]


def test_a_verified_token_is_trusted_for_the_cache_ttl_only(tmp_path: Path) -> None:
    """After its key leaves the JWKS, a cached token works until key_cache_ttl_s, then not."""
    path = tmp_path / "jwks.json"
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    write_jwks(path, old=old)
    now = [100.0]
    config = auth_config(
        jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_jwks_file=str(path), key_cache_ttl_s=30.0
    )
    verify = JWTVerifier(config, clock=lambda: now[0])
    verify.load()
    old_token = make_token(old, "ES256", kid="old")
    assert "alice" == verify.verify(old_token).user
    write_jwks(path, new=new)  # rotate: the old key is gone
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))
    now[0] += JWKS_RELOAD_S
    assert "alice" == verify.verify(make_token(new, "ES256", kid="new")).user  # reloaded
    assert "alice" == verify.verify(old_token).user  # still cached
    now[0] += 30.0
    assert "invalid credentials" == refusal(verify, old_token)
