"""mTLS: the caller is the subject of its verified client certificate.

The mapping: the certificate's common name (CN) is the user, its first
organization (O) the tenant ("default" when it has none); roles come from
``auth.mtls_roles``, the plan is "default". A certificate ``CN=alice,O=acme`` is
``Principal(tenant="acme", user="alice")``.

gRPC puts the peer's certificate in ``context.auth_context()`` only on a TLS
port; it has verified it against the trusted CAs when the port was created with
``grpc.ssl_server_credentials(..., require_client_auth=True)`` (Python's API has
no "request but don't verify" mode, so a certificate present here is verified).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tokenwire.auth.keys import make_principal
from tokenwire.context import Principal
from tokenwire.errors import InvalidArgumentError

__all__ = ["parse_subject", "principal_from_auth_context"]

_HEX = frozenset("0123456789abcdefABCDEF")


def principal_from_auth_context(
    auth_context: Mapping[str, Iterable[bytes]], *, roles: Iterable[str] = ()
) -> Principal | None:
    """The principal of a TLS peer's client certificate; None without one (or a usable CN)."""
    if [b"ssl"] != list(auth_context.get("transport_security_type", ())):
        return None
    names = list(auth_context.get("x509_common_name", ()))
    if not names:
        return None
    subjects = list(auth_context.get("x509_subject", ()))
    attributes = parse_subject(subjects[0].decode("utf-8", "replace")) if subjects else []
    tenant = next((value for kind, value in attributes if kind == "O"), "default")
    try:
        return make_principal(tenant, names[0].decode("utf-8", "replace"), roles)
    except InvalidArgumentError:
        return None


def parse_subject(subject: str) -> list[tuple[str, str]]:
    """``"CN=alice,O=Acme\\, Inc."`` → ``[("CN", "alice"), ("O", "Acme, Inc.")]`` (RFC 4514)."""
    attributes: list[tuple[str, str]] = []
    kind: str | None = None
    buf = bytearray()
    i = 0
    while i < len(subject):
        char = subject[i]
        if char == "\\" and i + 1 < len(subject):
            pair = subject[i + 1 : i + 3]
            if len(pair) == 2 and all(c in _HEX for c in pair):
                buf.append(int(pair, 16))  # \HH: one byte of UTF-8
                i += 3
            else:
                buf += subject[i + 1].encode()
                i += 2
            continue
        if char == "=" and kind is None:
            kind, buf = buf.decode("utf-8", "replace").strip(), bytearray()
        elif char in ",+":
            if kind is not None:
                attributes.append((kind, buf.decode("utf-8", "replace")))
            kind, buf = None, bytearray()
        else:
            buf += char.encode()
        i += 1
    if kind is not None:
        attributes.append((kind, buf.decode("utf-8", "replace")))
    return attributes
