"""Shared fixtures: a real in-process server on port 0 around a FakeBackend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from tokenwire.backend import BackendConfig, Engine
from tokenwire.config import LoggingConfig
from tokenwire.logs import configure_logging
from tokenwire.testing import FakeBackend, RunningServer, running_server

configure_logging(LoggingConfig(level="warning"))


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
