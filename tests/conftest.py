"""Shared fixtures: a real in-process server on port 0 around a FakeBackend; external services.

Redis (``TOKENWIRE_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``) and
PostgreSQL (``TOKENWIRE_TEST_POSTGRES_DSN``, default database ``test`` on
127.0.0.1:5432) back some tests. When one does not answer, its tests skip and
say why, unless ``TOKENWIRE_TEST_REQUIRE_SERVICES`` is set (``.ci/run`` sets
it): then the run stops before collecting anything, naming what is missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import importlib.util
import os
import re
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis

from tokenwire.backend import BackendConfig, Engine
from tokenwire.config import LoggingConfig
from tokenwire.logs import configure_logging
from tokenwire.testing import FakeBackend, RunningServer, running_server

configure_logging(LoggingConfig(level="warning"))

REQUIRE_SERVICES = "TOKENWIRE_TEST_REQUIRE_SERVICES"
REDIS_URL = os.environ.get("TOKENWIRE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("TOKENWIRE_TEST_POSTGRES_DSN", "postgresql://127.0.0.1:5432/test")


def services_required() -> bool:
    """True when ``TOKENWIRE_TEST_REQUIRE_SERVICES`` is set: Redis and PostgreSQL must answer."""
    return os.environ.get(REQUIRE_SERVICES, "").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def redis_problem() -> str | None:
    """Why Redis at REDIS_URL cannot be used, or None when it answers PING."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except (OSError, redis.RedisError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def postgres_address(dsn: str) -> tuple[str, int]:
    """The host and port of a PostgreSQL URL or ``key=value`` DSN (libpq's defaults aside)."""
    if "://" in dsn:
        url = urlsplit(dsn)
        return url.hostname or "127.0.0.1", url.port or 5432
    pairs = dict(part.split("=", 1) for part in dsn.split() if "=" in part)
    return pairs.get("host", "127.0.0.1"), int(pairs.get("port", "5432"))


@functools.cache
def postgres_problem() -> str | None:
    """Why PostgreSQL at POSTGRES_DSN cannot be used, or None when it answers.

    A TCP connect, then a real connection when a driver (psycopg or asyncpg) is installed.
    """
    host, port = postgres_address(POSTGRES_DSN)
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as exc:
        return f"no TCP connection to {host}:{port}: {exc}"
    try:
        if importlib.util.find_spec("psycopg") is not None:
            psycopg: Any = importlib.import_module("psycopg")
            psycopg.connect(POSTGRES_DSN, connect_timeout=2).close()
        elif importlib.util.find_spec("asyncpg") is not None:
            asyncpg: Any = importlib.import_module("asyncpg")

            async def connect() -> None:
                await (await asyncpg.connect(POSTGRES_DSN, timeout=2)).close()

            # Its own thread and loop: the caller may be inside the test session's loop.
            with concurrent.futures.ThreadPoolExecutor(1) as thread:
                thread.submit(asyncio.run, connect()).result()
    except Exception as exc:  # any driver error means the database is not usable
        return f"{type(exc).__name__}: {exc}"
    return None


def require_service(name: str, where: str, problem: str | None) -> None:
    """Skip the calling test when a service is unusable; fail it when services are required."""
    if problem is None:
        return
    message = f"{name} at {where} is unreachable ({problem})"
    if services_required():
        pytest.fail(f"{message}; {REQUIRE_SERVICES} is set, so it must answer")
    pytest.skip(f"{message}; set {REQUIRE_SERVICES}=1 to make this a failure")


def pytest_sessionstart(session: pytest.Session) -> None:
    """With TOKENWIRE_TEST_REQUIRE_SERVICES set, stop at once if Redis or PostgreSQL is down."""
    if not services_required():
        return
    problems = [
        f"{name} at {where}: {problem}"
        for name, where, problem in (
            ("Redis", REDIS_URL, redis_problem()),
            ("PostgreSQL", POSTGRES_DSN, postgres_problem()),
        )
        if problem is not None
    ]
    if problems:
        pytest.exit(
            f"{REQUIRE_SERVICES} is set but these services do not answer:\n  "
            + "\n  ".join(problems),
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def require_redis() -> None:
    """Skip the calling test when Redis is unreachable, or fail it when services are required."""
    require_service("Redis", REDIS_URL, redis_problem())


@contextlib.asynccontextmanager
async def redis_key_prefix(scope: str) -> AsyncIterator[str]:
    """A fresh Redis key prefix for ``scope`` (Redis required); its keys are deleted on exit."""
    require_redis()
    prefix = f"tokenwire-test:{scope}:{uuid.uuid4().hex}:"
    try:
        yield prefix
    finally:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis test server's URL; skips (or fails, when required) if it is down."""
    require_service("Redis", REDIS_URL, redis_problem())
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The PostgreSQL test database's DSN; skips (or fails, when required) if it is down."""
    require_service("PostgreSQL", POSTGRES_DSN, postgres_problem())
    return POSTGRES_DSN


@pytest.fixture
async def fake() -> FakeBackend:
    """A fake engine answering with a short fixed reply."""
    return FakeBackend(reply="Hello, world!")


@pytest.fixture
async def served(fake: FakeBackend) -> AsyncIterator[RunningServer]:
    """A running server around the ``fake`` backend, and a client channel."""
    async with running_server(fake) as running:
        yield running


async def wait_until(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Poll until ``predicate()`` holds, or fail after ``limit_s`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture(scope="session")
async def torch_engine() -> AsyncIterator[Engine]:
    """The real SmolLM2-135M-Instruct torch engine, loaded once per test session."""
    from tokenwire_torch import TorchEngine

    engine = TorchEngine(BackendConfig(device="cpu", max_running=4))
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common umask 022, under which new files are readable by everyone."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


async def spawn_server(*settings: str) -> tuple[asyncio.subprocess.Process, str]:
    """`tokenwire serve --backend fake` in its own process on a free port, with JSON logs
    on its stderr pipe and each ``key=value`` of ``settings`` as a ``--set``; returns the
    process and its address once it serves. The caller stops it."""
    args = [arg for setting in settings for arg in ("--set", setting)]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenwire", "serve",
        "--backend", "fake", "--listen", "127.0.0.1:0", "--log-format", "json", *args,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stderr is not None
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 60)
        if not line:
            await process.wait()
            raise AssertionError("the server exited before serving")
        if match := re.search(rb'"address": "([^"]+)"', line):
            return process, match.group(1).decode()
