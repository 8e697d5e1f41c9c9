"""The chat server over TLS and mTLS: server.tls_* settings, the certificate as the caller."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest

from tests.auth.test_mtls import Pki, _name, pki
from tokenwire.config import Config
from tokenwire.errors import ConfigError
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc
from tokenwire.testing import FakeBackend, config_for_tests, running_server

__all__ = ["pki"]


def _tls_config(pki: Pki, tmp_path: Path, *, mtls: bool) -> Config:
    (tmp_path / "server.key").write_bytes(pki.server_key)
    (tmp_path / "server.pem").write_bytes(pki.server_cert)
    (tmp_path / "ca.pem").write_bytes(pki.ca)
    config = config_for_tests()
    server = dataclasses.replace(
        config.server,
        tls_cert_file=str(tmp_path / "server.pem"),
        tls_key_file=str(tmp_path / "server.key"),
        tls_client_ca_file=str(tmp_path / "ca.pem") if mtls else "",
    )
    auth = dataclasses.replace(
        config.auth, enabled=True, mtls=mtls, api_keys=True, bootstrap_admin_key=False
    )
    store = dataclasses.replace(config.store, data_dir=str(tmp_path))
    return dataclasses.replace(config, server=server, auth=auth, store=store)


async def _complete(address: str, credentials: grpc.ChannelCredentials) -> tuple[str, str]:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        events = [e async for e in stub.Complete(chat_pb2.CompleteRequest(message="Hi"))]
    return events[0].started.conversation_id, "".join(e.delta.text for e in events)


async def test_mtls_client_certificate_is_the_caller(pki: Pki, tmp_path: Path) -> None:
    """With a client CA set, a certificate-holding client chats without any bearer token."""
    config = _tls_config(pki, tmp_path, mtls=True)
    async with running_server(FakeBackend(reply="ok"), config) as running:
        key, cert = pki.client(_name(CN="alice", O="acme"))
        credentials = grpc.ssl_channel_credentials(pki.ca, key, cert)
        _, text = await _complete(running.address, credentials)
        assert "ok" == text
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _complete(running.address, grpc.ssl_channel_credentials(pki.ca))
        assert grpc.StatusCode.UNAVAILABLE == raised.value.code()  # no client certificate


async def test_tls_without_client_ca_still_needs_credentials(pki: Pki, tmp_path: Path) -> None:
    """Plain TLS encrypts, but a caller without a key is still UNAUTHENTICATED."""
    config = _tls_config(pki, tmp_path, mtls=False)
    async with running_server(FakeBackend(reply="ok"), config) as running:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _complete(running.address, grpc.ssl_channel_credentials(pki.ca))
    assert grpc.StatusCode.UNAUTHENTICATED == raised.value.code()


async def test_half_a_tls_setup_is_a_config_error(tmp_path: Path) -> None:
    """A certificate without its key is refused at start-up with a clear message."""
    config = config_for_tests()
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, tls_cert_file=str(tmp_path / "x.pem"))
    )
    with pytest.raises(ConfigError, match="must be set together"):
        async with running_server(FakeBackend(), config):
            pass
