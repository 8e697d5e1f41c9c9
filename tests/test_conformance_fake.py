"""The engine conformance suite: the registered fake backend passes it, broken engines fail it."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tokenwire.backend import (
    BackendConfig,
    Capabilities,
    Chunk,
    Engine,
    GenerateRequest,
    LoadReport,
    create_backend,
)
from tokenwire.testing import FakeBackend
from tokenwire.testing.conformance import LONG_ANSWER, EngineConformance

PROMPT = list(b"Say something.")


@pytest.fixture(
    params=[
        {"token_delay_s": "0.001"},
        {"token_delay_s": "0.001", "tokens_per_chunk": "3"},
    ],
    ids=["one-token-chunks", "three-token-chunks"],
)
async def registered_fake(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    """The ``fake`` entry point's engine, paced like a model, started."""
    backend = create_backend(BackendConfig(name="fake", options=request.param))
    assert isinstance(backend, Engine)
    await backend.start()
    yield backend
    await backend.close()


class TestFakeBackendConformance(EngineConformance):
    """The conformance suite, run against the registered fake backend."""

    @pytest.fixture
    def engine(self, registered_fake: Engine) -> Engine:
        """The fake backend built through its entry point."""
        return registered_fake


# -- engines that break one rule each ------------------------------------------------


class _Wrapped:
    """A paced FakeBackend behind the bare Engine protocol: no ``steps_executed``.

    Without a step counter the suite can only hold it to the contract through
    ``load()`` and the stream itself; the flawed subclasses break one rule each.
    """

    token_delay_s = 0.001

    def __init__(self) -> None:
        self.inner = FakeBackend(token_delay_s=self.token_delay_s)

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def load(self) -> LoadReport:
        return self.inner.load()

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self.inner.generate(request)


class TestWrappedFakeConformance(EngineConformance):
    """The wrapper without its flaws passes, so each failure below is the flaw's."""

    @pytest.fixture
    def engine(self) -> Engine:
        """A paced fake engine without a step counter."""
        return _Wrapped()


class _SendsTheStopToken(_Wrapped):
    """Ignores stop token ids: the stop token is sent and the answer runs on."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self.inner.generate(dataclasses.replace(request, stop_token_ids=frozenset()))


class _StopsEarly(_Wrapped):
    """Ends the answer one token before its stop token."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        chunks = [chunk async for chunk in self.inner.generate(request)]
        tokens = [token for chunk in chunks for token in chunk.token_ids]
        if request.stop_token_ids and tokens:
            tokens.pop()
        for token in tokens:
            yield Chunk((token,))
        yield dataclasses.replace(chunks[-1], token_ids=(), completion_tokens=len(tokens))


class _OneTokenTooMany(_Wrapped):
    """Generates max_tokens + 1 tokens."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        longer = dataclasses.replace(request, max_tokens=request.max_tokens + 1)
        return self.inner.generate(longer)


class _ChunkAfterTheFinal(_Wrapped):
    """Yields one more chunk after the one that carries the finish reason."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        async for chunk in self.inner.generate(request):
            yield chunk
        yield Chunk((ord("!"),))


class _MiscountsTokens(_Wrapped):
    """Reports one completion token more than it sent."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        async for chunk in self.inner.generate(request):
            if chunk.finish_reason is not None:
                chunk = dataclasses.replace(chunk, completion_tokens=chunk.completion_tokens + 1)
            yield chunk


class _RandomTokens(_Wrapped):
    """Samples at random whatever the temperature or seed."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        async for chunk in self.inner.generate(request):
            yield dataclasses.replace(
                chunk, token_ids=tuple(random.randrange(256) for _ in chunk.token_ids)
            )


class _Counted(_Wrapped):
    """Counts its own requests in load(), so a subclass can get that count wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.held = 0

    def load(self) -> LoadReport:
        return LoadReport(running=self.held)


class _HoldsTheRequestAfterTheEnd(_Counted):
    """Keeps working on a request for a moment after its final chunk (a wasted step)."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.held += 1
        try:
            async for chunk in self.inner.generate(request):
                yield chunk
        finally:
            asyncio.get_running_loop().call_later(0.05, self._release)

    def _release(self) -> None:
        self.held -= 1


class _KeepsStoppedRequests(_Counted):
    """Frees a request only when its answer ends, never when the consumer stops early."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.held += 1
        async for chunk in self.inner.generate(request):
            yield chunk
        self.held -= 1


class _LoadAlwaysIdle(_Wrapped):
    """Reports no work at all, whatever runs."""

    def load(self) -> LoadReport:
        return LoadReport()


class _NeverAwaits(_Wrapped):
    """Produces a whole answer without letting the event loop run, so it cannot be cancelled."""

    token_delay_s = 0.0


# (flawed engine, the check that must catch it, the check's parameters)
FLAWS: list[tuple[type[_Wrapped], str, dict[str, Any]]] = [
    (_SendsTheStopToken, "test_stop_token_ends_the_answer_and_is_not_returned", {}),
    (_StopsEarly, "test_stop_token_ends_the_answer_and_is_not_returned", {}),
    (_OneTokenTooMany, "test_max_tokens_ends_the_answer_with_length", {"max_tokens": 1}),
    (_OneTokenTooMany, "test_max_tokens_ends_the_answer_with_length", {"max_tokens": LONG_ANSWER}),
    (_ChunkAfterTheFinal, "test_stream_shape", {}),
    (_ChunkAfterTheFinal, "test_nothing_follows_the_final_chunk", {"stop": False}),
    (_MiscountsTokens, "test_stream_shape", {}),
    (_RandomTokens, "test_greedy_is_deterministic", {}),
    (_RandomTokens, "test_seeded_sampling_is_reproducible", {}),
    (_RandomTokens, "test_concurrent_requests_match_solo_runs", {}),
    (_HoldsTheRequestAfterTheEnd, "test_nothing_follows_the_final_chunk", {"stop": False}),
    (_HoldsTheRequestAfterTheEnd, "test_nothing_follows_the_final_chunk", {"stop": True}),
    (_KeepsStoppedRequests, "test_aclose_stops_the_work", {}),
    (_KeepsStoppedRequests, "test_task_cancel_stops_the_work", {}),
    (_LoadAlwaysIdle, "test_aclose_stops_the_work", {}),
    (_LoadAlwaysIdle, "test_task_cancel_stops_the_work", {}),
    (_NeverAwaits, "test_task_cancel_stops_the_work", {}),
]


class _QuickSuite(EngineConformance):
    """The suite with a short settle time: the flawed engines never settle anyway."""

    settle_s = 0.3


@pytest.mark.parametrize(
    ("flawed", "check", "params"),
    FLAWS,
    ids=[f"{flawed.__name__.strip('_')}-{check}" for flawed, check, _ in FLAWS],
)
async def test_the_suite_fails_a_broken_engine(
    flawed: type[_Wrapped], check: str, params: dict[str, Any]
) -> None:
    """Each broken engine fails the check that covers the rule it breaks."""
    engine = flawed()
    await engine.start()
    try:
        with pytest.raises(AssertionError):
            await getattr(_QuickSuite(), check)(engine=engine, prompt_ids=PROMPT, **params)
    finally:
        await engine.close()
