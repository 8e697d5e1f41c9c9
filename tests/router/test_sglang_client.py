"""The router over SGLang's SglangScheduler (gRPC mode), against its stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tokenwire.backend import Engine
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine
from tokenwire.testing.conformance import EngineConformance
from tokenwire.testing.fake import FakeBackend
from tokenwire.testing.standins.server import running_standin


@pytest.fixture
async def routed() -> AsyncIterator[Engine]:
    """A RoutedEngine over one SGLang stand-in serving a paced fake engine."""
    fake = FakeBackend(token_delay_s=0.001, endless=True)
    async with running_standin("sglang", fake) as standin:
        engine = RoutedEngine(RouterConfig(workers=standin.target, poll_interval_s=0.02))
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()


class TestSglangConformance(EngineConformance):
    """Everything the framework relies on holds across SglangScheduler."""

    @pytest.fixture
    def engine(self, routed: Engine) -> Engine:
        """The router, speaking SglangScheduler to its worker."""
        return routed
