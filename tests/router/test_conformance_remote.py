"""The engine conformance suite, run against the router in front of a worker process-local."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tokenwire.backend import Engine
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine
from tokenwire.testing import FakeBackend, running_worker
from tokenwire.testing.conformance import EngineConformance


@pytest.fixture
async def routed() -> AsyncIterator[Engine]:
    """A RoutedEngine over one worker serving a paced fake engine."""
    async with running_worker(FakeBackend(token_delay_s=0.001, endless=True)) as worker:
        engine = RoutedEngine(RouterConfig(workers=worker.address, poll_interval_s=0.02))
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()


class TestRoutedEngineConformance(EngineConformance):
    """Everything the framework relies on holds across the engine protocol."""

    @pytest.fixture
    def engine(self, routed: Engine) -> Engine:
        """The router, speaking VllmEngine to its worker."""
        return routed
