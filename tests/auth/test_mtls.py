"""mTLS: a TLS server requiring client certificates; the certificate's subject is the caller."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.auth.conftest import auth_config, bearer
from tokenwire.auth import IssuedKey, SQLiteKeyStore
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.auth.mtls import principal_from_auth_context
from tokenwire.auth.principal import Principal
from tokenwire.context import current_call
from tokenwire.interceptors import CallInfo, ErrorsInterceptor, Interceptor, InterceptorChain
from tokenwire.testing.echo import EchoServicer, echo_pb2, echo_pb2_grpc


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1, and client credentials."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_name: x509.Name
    ca: bytes
    server_key: bytes
    server_cert: bytes

    def client(self, subject: x509.Name) -> tuple[bytes, bytes]:
        """A client key and certificate for ``subject``, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        return _pem_key(key), _sign(subject, key, self.ca_key, self.ca_name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _sign(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _name(**attributes: str) -> x509.Name:
    oids = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME}
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attributes.items()])


@pytest.fixture(scope="module")
def pki() -> Pki:
    """A CA and a server certificate valid for 127.0.0.1, made for this module."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(CN="tokenwire test CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return Pki(
        ca_key=ca_key,
        ca_name=ca_name,
        ca=_sign(ca_name, ca_key, ca_key, ca_name, ca=True),
        server_key=_pem_key(server_key),
        server_cert=_sign(_name(CN="127.0.0.1"), server_key, ca_key, ca_name, san=san),
    )


class PrincipalRecorder(Interceptor):
    """Records the principal each call was given."""

    def __init__(self) -> None:
        self.principals: list[Principal] = []

    async def intercept(self, proceed: Any, request: Any, context: Any, call: CallInfo) -> Any:
        self.principals.append(current_call().principal)
        return await proceed(request, context)


@asynccontextmanager
async def tls_echo(
    pki: Pki, auth: AuthInterceptor, recorder: PrincipalRecorder
) -> AsyncIterator[int]:
    """An echo server on a TLS port that requires client certificates from the test CA."""
    await auth.start()
    server = grpc.aio.server(interceptors=[InterceptorChain([ErrorsInterceptor(), auth, recorder])])
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), server)
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key, pki.server_cert)], root_certificates=pki.ca, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)
        await auth.close()


async def _echo(pki: Pki, port: int, subject: x509.Name, metadata: Any = None) -> Any:
    key, cert = pki.client(subject)
    credentials = grpc.ssl_channel_credentials(pki.ca, key, cert)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        unary = await stub.Unary(echo_pb2.EchoRequest(text="hi"), metadata=metadata)
        streamed = [
            r.text
            async for r in stub.ServerStream(
                echo_pb2.EchoRequest(text="s", count=2), metadata=metadata
            )
        ]
        return [unary.text, *streamed]


async def test_the_client_certificate_names_the_caller(pki: Pki, key_store: SQLiteKeyStore) -> None:
    """Over mTLS without a token, CN is the user, O the tenant, roles come from config."""
    recorder = PrincipalRecorder()
    auth = AuthInterceptor(auth_config(mtls=True, mtls_roles="reader"), "", key_store=key_store)
    async with tls_echo(pki, auth, recorder) as port:
        texts = await _echo(pki, port, _name(CN="carol", O="Acme, Inc."))
    assert ["hi", "s", "s"] == texts
    assert [Principal("Acme, Inc.", "carol", frozenset({"reader"}))] * 2 == recorder.principals


async def test_a_bearer_token_wins_over_the_certificate(
    pki: Pki, key_store: SQLiteKeyStore, alice_key: IssuedKey
) -> None:
    """A call with both a certificate and an API key runs as the key's principal."""
    recorder = PrincipalRecorder()
    auth = AuthInterceptor(auth_config(mtls=True), "", key_store=key_store)
    async with tls_echo(pki, auth, recorder) as port:
        await _echo(pki, port, _name(CN="carol"), bearer(alice_key.secret))
    assert ["acme/alice"] * 2 == [p.owner for p in recorder.principals]


async def test_certificates_are_ignored_when_mtls_is_off(
    pki: Pki, key_store: SQLiteKeyStore
) -> None:
    """With auth.mtls off, a client certificate alone is missing credentials."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    async with tls_echo(pki, auth, PrincipalRecorder()) as port:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _echo(pki, port, _name(CN="carol", O="acme"))
    assert grpc.StatusCode.UNAUTHENTICATED == raised.value.code()
    assert (raised.value.details() or "").startswith("missing credentials")


def _auth_context(pki: Pki, subject: x509.Name, **extra: list[bytes]) -> dict[str, list[bytes]]:
    """What gRPC puts in ``context.auth_context()`` for a TLS client with this subject."""
    _, cert = pki.client(subject)
    return {"transport_security_type": [b"ssl"], "x509_pem_cert": [cert], **extra}


def test_a_subject_without_an_organization_is_in_the_default_tenant(pki: Pki) -> None:
    """No O in the subject: tenant 'default'; no TLS, no certificate or no CN: no principal."""
    assert Principal("default", "dave") == principal_from_auth_context(
        _auth_context(pki, _name(CN="dave"))
    )
    assert None is principal_from_auth_context({"transport_security_type": [b"ssl"]})
    insecure = _auth_context(pki, _name(CN="dave")) | {"transport_security_type": [b"insecure"]}
    assert None is principal_from_auth_context(insecure)
    assert None is principal_from_auth_context(_auth_context(pki, _name(O="acme")))
    assert None is principal_from_auth_context(_auth_context(pki, _name(CN="eve", O="a/b")))


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (_name(CN="alice=x", O="Acme, Inc."), Principal("Acme, Inc.", "alice=x")),
        (_name(CN="café", O="ml+ops"), Principal("ml+ops", "café")),
        (_name(CN=r"back\slash", O="#23"), Principal("#23", r"back\slash")),
        (
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "first"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ml"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "second"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "frank"),
                ]
            ),
            Principal("first", "frank"),
        ),
        (
            x509.Name(
                [
                    x509.RelativeDistinguishedName(
                        [
                            x509.NameAttribute(NameOID.COMMON_NAME, "grace"),
                            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme"),
                        ]
                    )
                ]
            ),
            Principal("acme", "grace"),
        ),
    ],
)
def test_the_subject_is_read_from_the_certificate(
    pki: Pki, subject: x509.Name, expected: Principal
) -> None:
    """CN and the first O are taken verbatim from the certificate, whatever characters they hold."""
    assert expected == principal_from_auth_context(_auth_context(pki, subject))


def test_the_rendered_subject_is_not_trusted(pki: Pki) -> None:
    """The certificate decides; gRPC's x509_subject and x509_common_name strings are ignored."""
    context = _auth_context(
        pki,
        _name(CN="carol", O="acme"),
        x509_common_name=[b"mallory"],
        x509_subject=[b"CN=mallory,O=evil"],
    )
    assert Principal("acme", "carol") == principal_from_auth_context(context)


def test_a_malformed_certificate_names_no_one() -> None:
    """Bytes that are not a PEM certificate give no principal rather than an error."""
    context = {"transport_security_type": [b"ssl"], "x509_pem_cert": [b"not a certificate"]}
    assert None is principal_from_auth_context(context)
