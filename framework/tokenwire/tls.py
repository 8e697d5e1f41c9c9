"""TLS credentials from PEM files, for every listener and channel Tokenwire opens:
the gateway's port, a worker's port, and the gateway's channels to workers."""

from __future__ import annotations

import grpc

from tokenwire.errors import ConfigError

__all__ = ["channel_credentials", "read_pem", "server_credentials"]


def read_pem(path: str, what: str) -> bytes:
    """The file's bytes; ConfigError naming the setting ``what`` if unreadable."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path!r}: {exc}") from exc


def server_credentials(
    section: str, cert_file: str, key_file: str, client_ca_file: str
) -> grpc.ServerCredentials | None:
    """TLS for a listener (mTLS when ``client_ca_file`` is set), or None: plaintext."""
    if not (cert_file or key_file or client_ca_file):
        return None
    if not (cert_file and key_file):
        raise ConfigError(
            f"{section}.tls_cert_file and {section}.tls_key_file must be set together"
        )
    pair = (
        read_pem(key_file, f"{section}.tls_key_file"),
        read_pem(cert_file, f"{section}.tls_cert_file"),
    )
    client_ca = (
        read_pem(client_ca_file, f"{section}.tls_client_ca_file") if client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    section: str, ca_file: str, cert_file: str, key_file: str
) -> grpc.ChannelCredentials | None:
    """TLS for a channel (a client certificate when ``cert_file`` is set), or None."""
    if not (ca_file or cert_file or key_file):
        return None
    if bool(cert_file) != bool(key_file):
        raise ConfigError(
            f"{section}.tls_cert_file and {section}.tls_key_file must be set together"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, f"{section}.tls_ca_file") if ca_file else None,
        private_key=read_pem(key_file, f"{section}.tls_key_file") if key_file else None,
        certificate_chain=read_pem(cert_file, f"{section}.tls_cert_file") if cert_file else None,
    )
