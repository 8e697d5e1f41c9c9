"""The auth interceptor on every RPC shape: refusals, accepted credentials, roles, open methods."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.auth.conftest import (
    HS_SECRET,
    AuthServer,
    SigningKeys,
    auth_config,
    bearer,
    make_token,
    running_auth_server,
)
from tokenwire.auth import AuthConfig, IssuedKey, SQLiteKeyStore
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.auth.principal import Principal
from tokenwire.context import CallState, bind_call, current_call, reset_call
from tokenwire.errors import ConfigError
from tokenwire.interceptors import CallInfo, Interceptor, Proceed
from tokenwire.proto.v1 import admin_pb2
from tokenwire.testing.echo import echo_pb2

SHAPES = ["Unary", "ServerStream", "ClientStream", "Bidi"]
Metadata = tuple[tuple[str, str], ...] | None


class PrincipalRecorder(Interceptor):
    """Runs inside auth and records the principal each call was given."""

    def __init__(self) -> None:
        self.principals: list[Principal] = []

    async def intercept(self, proceed: Proceed, request: Any, context: Any, call: CallInfo) -> Any:
        self.principals.append(current_call().principal)
        return await proceed(request, context)


async def _requests(*texts: str) -> AsyncIterator[echo_pb2.EchoRequest]:
    for text in texts:
        yield echo_pb2.EchoRequest(text=text)


async def call_shape(
    server: AuthServer, shape: str, metadata: Metadata, *, refused: bool = False
) -> tuple[Any, str, list[str]]:
    """Make one call of ``shape``; its status code, details and the texts it got back.

    With ``refused``, request-streaming calls are opened without writing: a write
    racing the server's refusal fails on the client as INTERNAL (a grpc.aio quirk).
    """
    request = echo_pb2.EchoRequest(text="hi", count=2)
    stub = server.stub
    if refused and shape in ("ClientStream", "Bidi"):
        call = getattr(stub, shape)(metadata=metadata)
        return await call.code(), await call.details() or "", []
    try:
        if shape == "Unary":
            texts = [(await stub.Unary(request, metadata=metadata)).text]
        elif shape == "ServerStream":
            texts = [r.text async for r in stub.ServerStream(request, metadata=metadata)]
        elif shape == "ClientStream":
            texts = [(await stub.ClientStream(_requests("a", "b"), metadata=metadata)).text]
        else:
            texts = [r.text async for r in stub.Bidi(_requests("a", "b"), metadata=metadata)]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", []
    return grpc.StatusCode.OK, "", texts


def _other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def _credential(kind: str, store: SQLiteKeyStore, keys: SigningKeys) -> Metadata:
    rsa_key = keys.rsa_private
    if kind == "none":
        return None
    if kind == "not bearer":
        return (("authorization", "Basic YWxpY2U6cGFzcw=="),)
    if kind == "empty bearer":
        return (("authorization", "Bearer "),)
    if kind == "unknown key":
        return bearer("tw_" + "x" * 43)
    if kind == "revoked key":
        from tokenwire.auth import make_principal

        issued = await store.create_key(make_principal("acme", "alice"))
        await store.revoke_key(issued.key.id)
        return bearer(issued.secret)
    if kind == "garbage token":
        return bearer("not.a.jwt")
    if kind == "expired":
        return bearer(make_token(rsa_key, "RS256", kid="rsa1", expires_in=-60))
    if kind == "not yet valid":
        future = {"nbf": int(__import__("time").time()) + 600}
        return bearer(make_token(rsa_key, "RS256", kid="rsa1", claims=future))
    if kind == "wrong audience":
        return bearer(make_token(rsa_key, "RS256", kid="rsa1", claims={"aud": "someone-else"}))
    if kind == "wrong issuer":
        return bearer(make_token(rsa_key, "RS256", kid="rsa1", claims={"iss": "https://evil/"}))
    if kind == "bad signature":
        return bearer(make_token(_other_rsa_key(), "RS256", kid="rsa1"))
    if kind == "unknown kid":
        return bearer(make_token(rsa_key, "RS256", kid="rsa9"))
    if kind == "alg none":
        return bearer(jwt.encode({"sub": "alice", "iss": "x"}, None, algorithm="none"))
    if kind == "no exp":
        return bearer(make_token(rsa_key, "RS256", kid="rsa1", drop=["exp"]))
    if kind == "no tenant":
        return bearer(make_token(rsa_key, "RS256", kid="rsa1", drop=["tenant"]))
    raise AssertionError(kind)


REFUSALS = {
    "none": "missing credentials",
    "not bearer": "invalid credentials",
    "empty bearer": "invalid credentials",
    "unknown key": "invalid credentials",
    "revoked key": "invalid credentials",
    "garbage token": "invalid credentials",
    "expired": "expired credentials",
    "not yet valid": "credentials not yet valid",
    "wrong audience": "invalid credentials",
    "wrong issuer": "invalid credentials",
    "bad signature": "invalid credentials",
    "unknown kid": "invalid credentials",
    "alg none": "invalid credentials",
    "no exp": "invalid credentials",
    "no tenant": "invalid credentials",
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(REFUSALS))
async def test_bad_credentials_are_unauthenticated_on_every_shape(
    kind: str,
    shape: str,
    key_store: SQLiteKeyStore,
    signing_keys: SigningKeys,
    jwt_config: Callable[..., AuthConfig],
) -> None:
    """Each kind of bad credential is UNAUTHENTICATED with a coarse reason; no handler runs."""
    auth = AuthInterceptor(jwt_config(), "", key_store=key_store)
    async with running_auth_server(auth) as server:
        metadata = await _credential(kind, key_store, signing_keys)
        code, details, _ = await call_shape(server, shape, metadata, refused=True)
        assert (grpc.StatusCode.UNAUTHENTICATED, REFUSALS[kind]) == (
            code, details.split(":")[0],
        )  # fmt: skip
        assert 0 == server.echo.calls


ALICE = Principal("acme", "alice", frozenset({"reader"}), "pro")
ECHOED = {
    "Unary": ["hi"],
    "ServerStream": ["hi", "hi"],
    "ClientStream": ["a b"],
    "Bidi": ["a", "b"],
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "credential", ["api key", "HS256", "RS256 pem", "ES256 pem", "RS256 jwks", "ES256 jwks"]
)
async def test_valid_credentials_reach_the_handler_as_their_principal(
    credential: str,
    shape: str,
    key_store: SQLiteKeyStore,
    alice_key: IssuedKey,
    signing_keys: SigningKeys,
) -> None:
    """An API key or a JWT (HS256, RS256, ES256; key file or JWKS) passes as acme/alice."""
    keys = signing_keys
    common = {"jwt_issuer": "https://idp.test/", "jwt_audience": "other,tokenwire"}
    config, token = {
        "api key": lambda: (auth_config(), alice_key.secret),
        "HS256": lambda: (
            auth_config(jwt_key_file=str(keys.hs_secret_file), **common),
            make_token(HS_SECRET, "HS256"),
        ),
        "RS256 pem": lambda: (
            auth_config(jwt_key_file=str(keys.rsa_public_pem), **common),
            make_token(keys.rsa_private, "RS256"),
        ),
        "ES256 pem": lambda: (
            auth_config(jwt_key_file=str(keys.ec_public_pem), **common),
            make_token(keys.ec_private, "ES256"),
        ),
        "RS256 jwks": lambda: (
            auth_config(jwt_jwks_file=str(keys.jwks_file), **common),
            make_token(keys.rsa_private, "RS256", kid="rsa1"),
        ),
        "ES256 jwks": lambda: (
            auth_config(jwt_jwks_file=str(keys.jwks_file), **common),
            make_token(keys.ec_private, "ES256", kid="ec1"),
        ),
    }[credential]()
    recorder = PrincipalRecorder()
    auth = AuthInterceptor(config, "", key_store=key_store)
    async with running_auth_server(auth, [recorder]) as server:
        code, _, texts = await call_shape(server, shape, bearer(token))
    assert grpc.StatusCode.OK == code
    assert ECHOED[shape] == texts
    assert [ALICE] == recorder.principals


async def test_the_scheme_is_case_insensitive(
    key_store: SQLiteKeyStore, alice_key: IssuedKey
) -> None:
    """'bearer' in any case is accepted, as RFC 6750 allows."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    async with running_auth_server(auth) as server:
        metadata = (("authorization", f"bEaReR {alice_key.secret}"),)
        code, _, _ = await call_shape(server, "Unary", metadata)
    assert grpc.StatusCode.OK == code


async def test_api_keys_can_be_turned_off(
    key_store: SQLiteKeyStore, alice_key: IssuedKey, jwt_config: Callable[..., AuthConfig]
) -> None:
    """With auth.api_keys off, a valid key is invalid credentials (JWTs still work)."""
    auth = AuthInterceptor(jwt_config(api_keys=False), "", key_store=key_store)
    async with running_auth_server(auth) as server:
        code, details, _ = await call_shape(server, "Unary", bearer(alice_key.secret))
    assert (grpc.StatusCode.UNAUTHENTICATED, "invalid credentials") == (code, details)


async def test_a_jwt_without_jwt_configured_is_invalid(key_store: SQLiteKeyStore) -> None:
    """A bearer token that is not an API key is refused when no JWT key is configured."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    async with running_auth_server(auth) as server:
        token = make_token(HS_SECRET, "HS256")
        code, details, _ = await call_shape(server, "Unary", bearer(token))
    assert (grpc.StatusCode.UNAUTHENTICATED, "invalid credentials") == (code, details)


async def test_disabled_auth_lets_everyone_in_as_anonymous(key_store: SQLiteKeyStore) -> None:
    """With auth.enabled off, calls pass without credentials as the anonymous principal."""
    recorder = PrincipalRecorder()
    auth = AuthInterceptor(auth_config(enabled=False), "", key_store=key_store)
    async with running_auth_server(auth, [recorder]) as server:
        code, _, _ = await call_shape(server, "Unary", None)
        admin_call = server.admin.ListApiKeys(admin_pb2.ListApiKeysRequest())
        admin_code = await admin_call.code()
    assert (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED) == (code, admin_code)
    assert "anonymous" == recorder.principals[0].user


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("CreateApiKey", admin_pb2.CreateApiKeyRequest(tenant="acme", user="mallory")),
        ("ListApiKeys", admin_pb2.ListApiKeysRequest()),
        ("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(id="key_0000000000000000")),
    ],
)
async def test_a_caller_without_the_admin_role_is_permission_denied(
    method: str, request_: Any, key_store: SQLiteKeyStore, alice_key: IssuedKey
) -> None:
    """A known caller without the admin role gets PERMISSION_DENIED from every admin method."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    async with running_auth_server(auth) as server:
        call = getattr(server.admin, method)(request_, metadata=bearer(alice_key.secret))
        assert grpc.StatusCode.PERMISSION_DENIED == await call.code()
        assert "this method requires the 'admin' role" == await call.details()
        unauthenticated = getattr(server.admin, method)(request_)
        assert grpc.StatusCode.UNAUTHENTICATED == await unauthenticated.code()
        assert ["alice's laptop"] == [k.description for k in (await key_store.list_keys()).keys]


async def test_a_jwt_with_the_admin_role_may_administer(
    key_store: SQLiteKeyStore, signing_keys: SigningKeys, jwt_config: Callable[..., AuthConfig]
) -> None:
    """Roles from a JWT count: a token with roles 'admin ops' may list keys."""
    token = make_token(signing_keys.ec_private, "ES256", kid="ec1", claims={"roles": "admin ops"})
    auth = AuthInterceptor(jwt_config(), "", key_store=key_store)
    async with running_auth_server(auth) as server:
        response = await server.admin.ListApiKeys(
            admin_pb2.ListApiKeysRequest(), metadata=bearer(token)
        )
    assert [] == list(response.keys)


async def test_health_and_reflection_need_no_credentials(key_store: SQLiteKeyStore) -> None:
    """Health checks and server reflection work without credentials; other methods do not."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    async with running_auth_server(auth) as server:
        health = health_pb2_grpc.HealthStub(server.channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=""))
        reflect = reflection_pb2_grpc.ServerReflectionStub(server.channel)
        responses = [
            r
            async for r in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        ]
        code, _, _ = await call_shape(server, "Unary", None)
    assert health_pb2.HealthCheckResponse.SERVING == status.status
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"tokenwire.v1.AdminService", "grpc.health.v1.Health"} <= names
    assert grpc.StatusCode.UNAUTHENTICATED == code


async def test_open_methods_are_configurable(key_store: SQLiteKeyStore) -> None:
    """A method listed in auth.open_methods is callable without credentials."""
    config = auth_config(open_methods="/tokenwire.testing.v1.EchoService/Unary")
    auth = AuthInterceptor(config, "", key_store=key_store)
    async with running_auth_server(auth) as server:
        unary, _, _ = await call_shape(server, "Unary", None)
        stream, _, _ = await call_shape(server, "ServerStream", None)
        health = health_pb2_grpc.HealthStub(server.channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED) == (unary, stream)
    assert grpc.StatusCode.UNAUTHENTICATED == raised.value.code()


class FakeContext:
    """Just enough of a servicer context for calling intercept() directly."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata or ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata


async def test_the_response_stream_is_returned_untouched(
    key_store: SQLiteKeyStore, alice_key: IssuedKey
) -> None:
    """Auth hands back the handler's response stream itself: nothing runs per message."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    stream = object()

    async def proceed(request: Any, context: Any) -> Any:
        return stream

    call = CallInfo("/tokenwire.v1.ChatService/Complete", False, True)
    token = bind_call(CallState(request_id="r", method=call.method))
    try:
        context: Any = FakeContext(bearer(alice_key.secret))
        assert stream is await auth.intercept(proceed, None, context, call)
        assert ALICE == current_call().principal
    finally:
        reset_call(token)


@pytest.mark.parametrize("shape", SHAPES)
async def test_method_roles_deny_a_known_caller_without_the_role_on_every_shape(
    shape: str, key_store: SQLiteKeyStore, alice_key: IssuedKey
) -> None:
    """auth.method_roles: alice lacks 'echo' → PERMISSION_DENIED; with it, she passes."""
    config = auth_config(method_roles="/tokenwire.testing.v1.EchoService/*=echo")
    async with running_auth_server(AuthInterceptor(config, "", key_store=key_store)) as server:
        code, details, _ = await call_shape(server, shape, bearer(alice_key.secret), refused=True)
        assert (grpc.StatusCode.PERMISSION_DENIED, "this method requires the 'echo' role") == (
            code,
            details,
        )
        echoer = await key_store.create_key(
            Principal(tenant="acme", user="bob", roles=frozenset({"echo"}))
        )
        code, _, texts = await call_shape(server, shape, bearer(echoer.secret))
    assert grpc.StatusCode.OK == code
    assert ECHOED[shape] == texts


def test_method_roles_must_be_method_equals_role() -> None:
    """A malformed method_roles rule is a ConfigError naming the expected form."""
    with pytest.raises(ConfigError, match="METHOD=ROLE"):
        AuthInterceptor(auth_config(method_roles="chat"), "")
