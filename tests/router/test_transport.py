"""How gateways reach workers: mutual TLS, and workers found through DNS."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.auth.test_mtls import Pki, _name, pki  # noqa: F401 - the fixture, shared
from tokenwire.errors import ConfigError
from tokenwire.proto.v1 import chat_pb2
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine, resolve_workers
from tokenwire.testing import FakeBackend, config_for_tests, running_server, running_worker


def _write(tmp_path: Path, **files: bytes) -> dict[str, str]:
    paths = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(data)
        paths[name] = str(path)
    return paths


async def test_a_worker_requiring_client_certificates_serves_only_gateways_with_one(
    pki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """With worker.tls_client_ca_file, a gateway with a certificate from that CA gets
    answers; one without a client certificate cannot start."""
    client_key, client_cert = pki.client(_name(CN="gateway"))
    files = _write(
        tmp_path,
        ca=pki.ca,
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        client_cert=client_cert,
        client_key=client_key,
    )
    tls = {
        "tls_cert_file": files["server_cert"],
        "tls_key_file": files["server_key"],
        "tls_client_ca_file": files["ca"],
    }
    async with running_worker(FakeBackend(reply="over mTLS"), **tls) as worker:
        router = RouterConfig(
            workers=worker.address,
            tls_ca_file=files["ca"],
            tls_cert_file=files["client_cert"],
            tls_key_file=files["client_key"],
        )
        async with running_server(RoutedEngine(router), config_for_tests(router=router)) as gw:
            request = chat_pb2.CompleteRequest(message="hi")
            events = [e async for e in gw.chat.Complete(request)]
        anonymous = RouterConfig(
            workers=worker.address, tls_ca_file=files["ca"], connect_timeout_s=0.5
        )
        with pytest.raises(ConfigError, match="no worker"):
            async with running_server(RoutedEngine(anonymous)):
                pass
    assert "over mTLS" == "".join(e.delta.text for e in events if e.HasField("delta"))


async def test_dns_entries_resolve_to_every_address() -> None:
    """dns:///NAME:PORT becomes one HOST:PORT per address; plain entries stay as given."""
    found = await resolve_workers(("dns:///localhost:50061", "10.0.0.5:50061"))
    assert "127.0.0.1:50061" in found
    assert "10.0.0.5:50061" == found[-1]
    with pytest.raises(ConfigError, match="needs a port"):
        await resolve_workers(("dns:///localhost",))


async def test_a_gateway_finds_its_worker_through_dns() -> None:
    """router.workers = dns:///localhost:PORT reaches a worker on 127.0.0.1."""
    async with running_worker(FakeBackend(reply="found")) as worker:
        router = RouterConfig(workers=f"dns:///localhost:{worker.port}", dns_refresh_s=0.1)
        engine = RoutedEngine(router)
        async with running_server(engine, config_for_tests(router=router)) as gw:
            request = chat_pb2.CompleteRequest(message="hi")
            events = [e async for e in gw.chat.Complete(request)]
    assert "found" == "".join(e.delta.text for e in events if e.HasField("delta"))
