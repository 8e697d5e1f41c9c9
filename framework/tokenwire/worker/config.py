"""The ``[worker]`` section: how ``tokenwire worker`` listens and whom it accepts.

A worker accepts only gateways: with a shared ``token`` each call must carry
``authorization: Bearer <token>``; with ``tls_client_ca_file`` each connection must
present a client certificate from that CA (mTLS). Health checks need neither, so
orchestrators can probe.

    [worker]
    listen = "0.0.0.0:50061"
    token_file = "/etc/tokenwire/worker-token"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenwire.config_fields import setting
from tokenwire.errors import ConfigError

__all__ = ["WorkerConfig", "read_token"]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """``tokenwire worker``: one engine served over the engine protocol."""

    listen: str = setting("127.0.0.1:50061", "HOST:PORT the worker listens on; port 0: any")
    token: str = setting(
        "", "shared secret gateways send as a bearer token; empty: token_file, or none"
    )
    token_file: str = setting("", "file holding the shared secret (instead of token)")
    tls_cert_file: str = setting("", "PEM certificate chain of the worker (TLS)")
    tls_key_file: str = setting("", "PEM private key of the worker's certificate")
    tls_client_ca_file: str = setting(
        "", "PEM CA that gateway certificates must chain to; set: mTLS is required"
    )
    message_interval_ms: float = setting(
        0.0,
        "least milliseconds between two messages of one answer: tokens made meanwhile "
        "ride in the next (0: each as soon as it is ready); a few ms cuts the messages "
        "of an engine faster than that, for gateway and worker alike",
    )
    grace_period_s: float = setting(
        30.0, "on SIGTERM, seconds running streams get to finish (new ones are refused)"
    )

    def __post_init__(self) -> None:
        if not self.message_interval_ms >= 0:
            raise ConfigError(
                f"worker.message_interval_ms must be >= 0, got {self.message_interval_ms}"
            )

    def secret(self) -> str:
        """The shared token (from ``token`` or ``token_file``); empty: none."""
        return read_token(self.token, self.token_file, "worker")


def read_token(token: str, token_file: str, section: str) -> str:
    """``token``, or the stripped contents of ``token_file``; ConfigError if unreadable."""
    if token and token_file:
        raise ConfigError(f"{section}.token and {section}.token_file are exclusive; set one")
    if not token_file:
        return token
    try:
        secret = Path(token_file).expanduser().read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {section}.token_file {token_file!r}: {exc}") from exc
    if not secret:
        raise ConfigError(f"{section}.token_file {token_file!r} is empty")
    return secret
