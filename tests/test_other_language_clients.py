"""The example clients in other languages (examples/clients/) against a live TLS server.

Each client is built or installed here (npm ci; cmake and make), kept between runs
in its example folder (git-ignored), then run against a real server on 127.0.0.1:0
with TLS and an API key: a streamed Converse turn, a second turn cancelled mid-answer
with CancelTurn, the conversation list. Its output and what the server stored must
agree. Without node/npm or the C++ toolchain and gRPC packages the tests skip, unless
``TOKENWIRE_TEST_REQUIRE_SERVICES`` is set: then they fail (``scripts/install-clients``
installs everything).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.auth.test_mtls import Pki, pki
from tests.conftest import REQUIRE_SERVICES, services_required
from tokenwire.auth import make_principal
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

__all__ = ["pki"]

CLIENTS = Path(__file__).resolve().parent.parent / "examples" / "clients"
NODE_DIR = CLIENTS / "node"
CPP_DIR = CLIENTS / "cpp"
# The same stamp scripts/install-clients writes: node_modules was made from this lock.
NODE_STAMP = NODE_DIR / "node_modules" / ".tokenwire-lock.sha256"

# Long and slow enough (about a second a turn) that a cancel lands mid-answer.
REPLY = "Tokenwire streams this answer one byte at a time, slowly enough to be cancelled."
TOKEN_DELAY_S = 0.012
SECOND_MESSAGE = "Tell me a long story."


def _require(problem: str | None) -> None:
    """Skip when a client's toolchain is missing, or fail when services are required."""
    if problem is None:
        return
    if services_required():
        pytest.fail(f"{problem}; {REQUIRE_SERVICES} is set (run scripts/install-clients)")
    pytest.skip(f"{problem}; scripts/install-clients installs what is missing")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: two test runs never build into one folder at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(args: list[str], cwd: Path, timeout_s: float) -> None:
    """Run a build step; fail the test with its output's tail when it does not succeed."""
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        pytest.fail(f"{' '.join(args)} failed with exit status {result.returncode}:\n{output}")


def _node_problem() -> str | None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        return f"the Node client needs {' and '.join(missing)}, not found on PATH"
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    major = version.stdout.strip().lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 18:
        return f"the Node client needs Node.js 18 or newer, found {version.stdout.strip()!r}"
    return None


def _cpp_problem() -> str | None:
    tools = ("cmake", "c++", "pkg-config", "protoc", "grpc_cpp_plugin")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"the C++ client needs {', '.join(missing)}, not found on PATH"
    for module in ("grpc++", "protobuf"):
        if subprocess.run(["pkg-config", "--exists", module], check=False).returncode != 0:
            return f"the C++ client needs the {module} development package (pkg-config {module})"
    return None


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """The Node client's command line, after npm ci when node_modules is not from the lock."""
    _require(_node_problem())
    lock = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    with _locked(NODE_DIR / ".install.lock"):
        if not NODE_STAMP.is_file() or NODE_STAMP.read_text().strip() != lock:
            _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], NODE_DIR, 600)
            NODE_STAMP.write_text(lock + "\n")
    return ["node", str(NODE_DIR / "client.js")]


@pytest.fixture(scope="module")
def cpp_client() -> list[str]:
    """The C++ client's command line, built (incrementally) in examples/clients/cpp/build."""
    _require(_cpp_problem())
    build = CPP_DIR / "build"
    with _locked(build / ".build.lock"):
        configure = ["cmake", "-S", str(CPP_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
        configured = subprocess.run(configure, capture_output=True, timeout=120, check=False)
        if configured.returncode != 0:
            # A cache from another checkout's path (or a broken one): start afresh.
            shutil.rmtree(build / "CMakeFiles", ignore_errors=True)
            (build / "CMakeCache.txt").unlink(missing_ok=True)
            _run(configure, CPP_DIR, 120)
        jobs = str(os.cpu_count() or 2)
        _run(["cmake", "--build", str(build), "--parallel", jobs], CPP_DIR, 900)
    return [str(build / "tokenwire_client")]


@dataclass
class TlsServer:
    """A running TLS server with API-key auth, its store, a caller's key and the CA file."""

    running: RunningServer
    store: SQLiteConversationStore
    owner: str
    api_key: str
    ca_file: Path


@pytest.fixture
async def tls_server(pki: Pki, tmp_path: Path) -> AsyncIterator[TlsServer]:
    """A server on 127.0.0.1:0 over TLS, every call needing an API key; a slow fake model."""
    (tmp_path / "server.key").write_bytes(pki.server_key)
    (tmp_path / "server.pem").write_bytes(pki.server_cert)
    (tmp_path / "ca.pem").write_bytes(pki.ca)
    config = config_for_tests()
    config = dataclasses.replace(
        config,
        server=dataclasses.replace(
            config.server,
            tls_cert_file=str(tmp_path / "server.pem"),
            tls_key_file=str(tmp_path / "server.key"),
        ),
        auth=dataclasses.replace(
            config.auth, enabled=True, api_keys=True, bootstrap_admin_key=False
        ),
        store=dataclasses.replace(config.store, data_dir=str(tmp_path)),
    )
    store = SQLiteConversationStore(":memory:")
    fake = FakeBackend(reply=REPLY, token_delay_s=TOKEN_DELAY_S)
    async with running_server(fake, config, store=store) as running:
        auth = running.server.pipeline.auth
        assert auth is not None
        principal = make_principal("acme", "alice", ["reader"])
        issued = await auth.key_store.create_key(principal, description="example client")
        yield TlsServer(running, store, principal.owner, issued.secret, tmp_path / "ca.pem")


async def _run_client(command: list[str], server: TlsServer, message: str) -> dict[str, list[str]]:
    """Run a client against ``server`` (the key from the environment, the rest as flags);
    return its output lines grouped by name, in order."""
    process = await asyncio.create_subprocess_exec(
        *command,
        "--address", server.running.address,
        "--ca", str(server.ca_file),
        "--message", message,
        "--timeout-s", "30",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TOKENWIRE_API_KEY": server.api_key},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    output = stdout.decode()
    assert 0 == process.returncode, f"the client failed:\n{output}{stderr.decode()}"
    lines: dict[str, list[str]] = {}
    for line in output.splitlines():
        name, _, value = line.partition(": ")
        lines.setdefault(name, []).append(value)
    return lines


async def _check_session(command: list[str], server: TlsServer, message: str) -> None:
    lines = await _run_client(command, server, message)
    deltas = [json.loads(text) for text in lines["delta"]]
    partial = "".join(json.loads(text) for text in lines["partial"])
    [conversation_id] = lines["conversation"]

    assert REPLY == "".join(deltas)
    assert len(deltas) > 1  # streamed as it was generated, not one message at the end
    assert ["STOP"] == lines["finished"]
    assert ["CANCELLED"] == lines["cancelled"]
    assert 0 < len(partial) < len(REPLY)  # cut short mid-answer
    assert REPLY.startswith(partial)
    assert ["1"] == lines["conversations"]
    assert [conversation_id] == lines["listed"]

    # The store holds exactly what the client was sent, the cut answer marked incomplete.
    stored = await server.store.list_messages(server.owner, conversation_id)
    expected = [
        ("user", message, True),
        ("assistant", REPLY, True),
        ("user", SECOND_MESSAGE, True),
        ("assistant", partial, False),
    ]
    assert expected == [(m.role, m.content, m.complete) for m in stored]
    assert lines["turn"] == list(dict.fromkeys(m.turn_id for m in stored))


async def test_node_client_streams_cancels_and_lists(
    node_client: list[str], tls_server: TlsServer
) -> None:
    """The Node client (grpc-js) streams a turn over TLS, cancels the next, lists conversations."""
    await _check_session(node_client, tls_server, "Hello from Node!")


async def test_cpp_client_streams_cancels_and_lists(
    cpp_client: list[str], tls_server: TlsServer
) -> None:
    """The C++ client (grpc++) streams a turn over TLS, cancels the next, lists conversations."""
    await _check_session(cpp_client, tls_server, "Hello from C++!")
