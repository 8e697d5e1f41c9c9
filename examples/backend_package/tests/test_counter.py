"""The counting engine, found through its entry point, passes Tokenwire's engine conformance suite.

Run from this folder after ``pip install -e '.[test]'``: ``pytest``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tokenwire.backend import BackendConfig, Engine, create_backend
from tokenwire.testing.conformance import EngineConformance


@pytest.fixture(scope="module")
async def counter() -> AsyncIterator[Engine]:
    """The engine that ``backend.name = "counter"`` builds, started."""
    engine = create_backend(BackendConfig(name="counter"))
    assert isinstance(engine, Engine)
    await engine.start()
    yield engine
    await engine.close()


class TestCountingEngine(EngineConformance):
    """Every check of the suite, run against the counting engine."""

    @pytest.fixture
    def engine(self, counter: Engine) -> Engine:
        """The engine under test."""
        return counter
