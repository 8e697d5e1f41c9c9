"""mTLS: the caller is the subject of its verified client certificate.

The mapping: the certificate's common name (CN) is the user, its organization
(O) the tenant ("default" when it has none), the first of each in the order the
certificate lists them; roles come from ``auth.mtls_roles``, the plan is
"default". A certificate ``CN=alice,O=acme`` is ``Principal(tenant="acme", user="alice")``.

gRPC puts the peer's certificate in ``context.auth_context()`` only on a TLS
port; it has verified it against the trusted CAs when the port was created with
``grpc.ssl_server_credentials(..., require_client_auth=True)`` (Python's API has
no "request but don't verify" mode, so a certificate present here is verified).
The subject is read from that certificate (``x509_pem_cert``) with
:mod:`cryptography`, attribute by attribute, rather than from gRPC's one-line
rendering of it, so escaped commas, plus signs and UTF-8 in names need no parsing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from tokenwire.auth.keys import make_principal
from tokenwire.auth.principal import Principal
from tokenwire.errors import InvalidArgumentError

__all__ = ["principal_from_auth_context"]


def principal_from_auth_context(
    auth_context: Mapping[str, Iterable[bytes]], *, roles: Iterable[str] = ()
) -> Principal | None:
    """The principal of a TLS peer's client certificate; None without one (or a usable CN)."""
    if [b"ssl"] != list(auth_context.get("transport_security_type", ())):
        return None
    certificates = list(auth_context.get("x509_pem_cert", ()))
    if not certificates:
        return None
    try:
        subject = x509.load_pem_x509_certificate(certificates[0]).subject
        user = _first(subject, NameOID.COMMON_NAME)
        tenant = _first(subject, NameOID.ORGANIZATION_NAME)
    except ValueError:  # not a certificate, or a subject that does not decode
        return None
    if user is None:
        return None
    try:
        return make_principal("default" if tenant is None else tenant, user, roles)
    except InvalidArgumentError:
        return None


def _first(subject: x509.Name, oid: ObjectIdentifier) -> str | None:
    """The value of the subject's first ``oid`` attribute, in certificate order."""
    attributes = subject.get_attributes_for_oid(oid)
    if not attributes:
        return None
    value = attributes[0].value  # bytes only for bit-string types, never CN or O
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
