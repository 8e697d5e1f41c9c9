"""Auth fixtures: key stores, signing keys, tokens, and a server with the AdminService."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tokenwire.auth import AuthConfig, IssuedKey, SQLiteKeyStore, make_principal
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.interceptors import ErrorsInterceptor, Interceptor, InterceptorChain
from tokenwire.proto.v1 import admin_pb2_grpc
from tokenwire.services.admin import ADMIN_SERVICE_NAME, add_admin_service
from tokenwire.testing.echo import EchoServicer, echo_pb2, echo_pb2_grpc

if TYPE_CHECKING:
    from tokenwire.proto.testing.v1.echo_pb2_grpc import EchoServiceAsyncStub
    from tokenwire.proto.v1.admin_pb2_grpc import AdminServiceAsyncStub

ISSUER = "https://idp.test/"
AUDIENCE = "tokenwire"
HS_SECRET = b"0123456789abcdef0123456789abcdef-test-secret"


def bearer(credential: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``credential`` as a bearer token."""
    return (("authorization", f"Bearer {credential}"),)


def auth_config(**fields: Any) -> AuthConfig:
    """Auth for tests: no key cache (revocations act at once), no bootstrap key."""
    return dataclasses.replace(AuthConfig(key_cache_ttl_s=0.0, bootstrap_admin_key=False), **fields)


@dataclass(frozen=True)
class SigningKeys:
    """Key pairs made for this test session, and their public halves on disk."""

    rsa_private: rsa.RSAPrivateKey
    ec_private: ec.EllipticCurvePrivateKey
    directory: Path

    @property
    def rsa_public_pem(self) -> Path:
        return self.directory / "rsa.pem"

    @property
    def ec_public_pem(self) -> Path:
        return self.directory / "ec.pem"

    @property
    def hs_secret_file(self) -> Path:
        return self.directory / "hs.secret"

    @property
    def jwks_file(self) -> Path:
        return self.directory / "jwks.json"


def _public_pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_jwks(path: Path, **keys: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    """A JWKS file with the public halves of ``keys``, each under its kid."""
    entries = []
    for kid, private in keys.items():
        algorithm: Any = (
            jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey)
            else jwt.algorithms.ECAlgorithm
        )  # fmt: skip
        entry = json.loads(algorithm.to_jwk(private.public_key()))
        entries.append(entry | {"kid": kid, "use": "sig"})
    path.write_text(json.dumps({"keys": entries}))


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> SigningKeys:
    """An RSA-2048 and a P-256 key pair, their PEM public keys, an HS secret and a JWKS."""
    keys = SigningKeys(
        rsa_private=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_private=ec.generate_private_key(ec.SECP256R1()),
        directory=tmp_path_factory.mktemp("jwt"),
    )
    keys.rsa_public_pem.write_bytes(_public_pem(keys.rsa_private))
    keys.ec_public_pem.write_bytes(_public_pem(keys.ec_private))
    keys.hs_secret_file.write_bytes(HS_SECRET + b"\n")
    write_jwks(keys.jwks_file, rsa1=keys.rsa_private, ec1=keys.ec_private)
    return keys


def make_token(
    key: Any,
    algorithm: str,
    *,
    claims: Mapping[str, Any] | None = None,
    kid: str | None = None,
    expires_in: float = 300.0,
    drop: Sequence[str] = (),
) -> str:
    """A signed JWT for acme/alice from ISSUER to AUDIENCE, with ``claims`` on top."""
    now = time.time()
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "tenant": "acme",
        "roles": ["reader"],
        "plan": "pro",
        "iat": int(now),
        "exp": int(now + expires_in),
        **(claims or {}),
    }
    for name in drop:
        payload.pop(name, None)
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


@pytest.fixture
async def key_store() -> AsyncIterator[SQLiteKeyStore]:
    """An open in-memory key store."""
    async with SQLiteKeyStore(":memory:") as store:
        yield store


@pytest.fixture
async def alice_key(key_store: SQLiteKeyStore) -> IssuedKey:
    """A key for acme/alice with the reader role and the pro plan."""
    principal = make_principal("acme", "alice", ["reader"], "pro")
    return await key_store.create_key(principal, description="alice's laptop")


@pytest.fixture
async def admin_key(key_store: SQLiteKeyStore) -> IssuedKey:
    """A key for default/root with the admin role."""
    return await key_store.create_key(make_principal("default", "root", ["admin"]))


@dataclass
class AuthServer:
    """Echo, AdminService, health and reflection behind errors + auth (+ extra) interceptors."""

    auth: AuthInterceptor
    echo: EchoServicer
    channel: grpc.aio.Channel
    stub: EchoServiceAsyncStub
    admin: AdminServiceAsyncStub
    address: str


@asynccontextmanager
async def running_auth_server(
    auth: AuthInterceptor, extra: Sequence[Interceptor] = ()
) -> AsyncIterator[AuthServer]:
    """Serve on 127.0.0.1:0 as the gateway would, with ``auth`` started and closed around it."""
    await auth.start()
    server = grpc.aio.server(interceptors=[InterceptorChain([ErrorsInterceptor(), auth, *extra])])
    echo = EchoServicer()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(echo, server)
    add_admin_service(server, auth.key_store)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [echo_pb2.DESCRIPTOR.services_by_name["EchoService"].full_name, ADMIN_SERVICE_NAME]
    reflection.enable_server_reflection([*names, "grpc.health.v1.Health"], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield AuthServer(
            auth, echo, channel, echo_pb2_grpc.EchoServiceStub(channel),
            admin_pb2_grpc.AdminServiceStub(channel), address,
        )  # fmt: skip
    finally:
        await channel.close(None)
        await server.stop(0)
        await auth.close()


@pytest.fixture
def jwt_config(signing_keys: SigningKeys) -> Callable[..., AuthConfig]:
    """Auth accepting API keys and JWTs verified with the JWKS file (RS256 and ES256)."""

    def build(**fields: Any) -> AuthConfig:
        return auth_config(
            jwt_jwks_file=str(signing_keys.jwks_file),
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
            jwt_leeway_s=0.0,
            **fields,
        )

    return build
