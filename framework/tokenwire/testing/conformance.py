"""The conformance suite every engine passes: subclass it in a test module.

    from tokenwire.testing.conformance import EngineConformance

    @pytest.fixture(scope="module")
    async def my_engine():
        engine = MyEngine(...)
        await engine.start()
        yield engine
        await engine.close()

    class TestMyEngine(EngineConformance):
        @pytest.fixture
        def engine(self, my_engine):
            return my_engine

Override ``prompt_ids`` if the engine needs particular token ids. Engines that
expose a ``steps_executed`` counter also prove they stop stepping on cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tokenwire.backend import Chunk, Engine, FinishReason, GenerateRequest, SamplingParams

__all__ = ["EngineConformance", "collect"]

_SETTLE_S = 5.0  # generous bound for a stopped request to leave load(); CPU CI is slow


async def collect(engine: Engine, request: GenerateRequest) -> list[Chunk]:
    """All chunks of one request."""
    return [chunk async for chunk in engine.generate(request)]


async def _until_idle(engine: Engine) -> None:
    deadline = asyncio.get_running_loop().time() + _SETTLE_S
    while engine.load().running or engine.load().queued:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"engine still busy after cancel: {engine.load()}")
        await asyncio.sleep(0.01)


class EngineConformance:
    """Behaviour the framework relies on from every :class:`~tokenwire.backend.Engine`."""

    @pytest.fixture
    def prompt_ids(self) -> list[int]:
        """A short prompt; the ids are valid in any vocabulary of 256+ tokens."""
        return list(b"Say something.")

    def request(self, prompt: list[int], max_tokens: int = 8, **sampling: Any) -> GenerateRequest:
        return GenerateRequest(
            request_id=f"conformance-{id(prompt)}-{max_tokens}",
            prompt_token_ids=prompt,
            max_tokens=max_tokens,
            sampling=SamplingParams(**sampling),
        )

    async def test_satisfies_the_engine_protocol(self, engine: Engine) -> None:
        """The engine has every member of the Engine protocol and sane capabilities."""
        assert isinstance(engine, Engine)
        assert engine.capabilities.model
        assert engine.capabilities.context_length > 0
        assert engine.capabilities.max_batch >= 1

    async def test_stream_shape(self, engine: Engine, prompt_ids: list[int]) -> None:
        """Every chunk but the last has tokens; the last finishes with exact counts."""
        chunks = await collect(engine, self.request(prompt_ids, 8))
        *body, last = chunks
        assert all(chunk.token_ids for chunk in body)
        assert all(chunk.finish_reason is None for chunk in body)
        assert last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert sum(len(c.token_ids) for c in chunks) == last.completion_tokens
        assert len(prompt_ids) == last.prompt_tokens

    async def test_max_tokens_bounds_the_answer(
        self, engine: Engine, prompt_ids: list[int]
    ) -> None:
        """No more than max_tokens tokens; reaching it finishes with LENGTH."""
        chunks = await collect(engine, self.request(prompt_ids, 3))
        produced = sum(len(c.token_ids) for c in chunks)
        assert produced <= 3
        if produced == 3:
            assert chunks[-1].finish_reason == FinishReason.LENGTH

    async def test_greedy_is_deterministic(self, engine: Engine, prompt_ids: list[int]) -> None:
        """Temperature 0 gives the same tokens every time."""
        first = await collect(engine, self.request(prompt_ids, 6))
        second = await collect(engine, self.request(prompt_ids, 6))
        assert _tokens(first)
        assert _tokens(first) == _tokens(second)

    async def test_seeded_sampling_is_reproducible(
        self, engine: Engine, prompt_ids: list[int]
    ) -> None:
        """The same seed and params give the same tokens."""
        req = self.request(prompt_ids, 6, temperature=1.0, top_p=0.9, seed=1234)
        assert _tokens(await collect(engine, req)) == _tokens(await collect(engine, req))

    async def test_aclose_stops_the_work(self, engine: Engine, prompt_ids: list[int]) -> None:
        """Closing the stream after one chunk frees the request within one step."""
        stream = engine.generate(self.request(prompt_ids, 200))
        first = await anext(stream)
        assert first.token_ids
        await _aclose(stream)
        await _until_idle(engine)
        await _assert_no_more_steps(engine)

    async def test_task_cancel_stops_the_work(self, engine: Engine, prompt_ids: list[int]) -> None:
        """Cancelling the consuming task frees the request within one step."""
        got_one = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(self.request(prompt_ids, 200)):
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), 60)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _until_idle(engine)
        await _assert_no_more_steps(engine)

    async def test_concurrent_requests_match_solo_runs(
        self, engine: Engine, prompt_ids: list[int]
    ) -> None:
        """Two greedy requests at once each get the tokens they get alone."""
        other = [*prompt_ids[:-1], prompt_ids[-1] ^ 1]
        solo = [_tokens(await collect(engine, self.request(p, 5))) for p in (prompt_ids, other)]
        together = await asyncio.gather(
            *(collect(engine, self.request(p, 5)) for p in (prompt_ids, other))
        )
        assert solo == [_tokens(chunks) for chunks in together]

    async def test_load_report_is_in_range(self, engine: Engine) -> None:
        """An idle engine reports no running work and a KV-cache use in [0, 1]."""
        await _until_idle(engine)
        report = engine.load()
        assert report.running == 0
        assert 0.0 <= report.kv_cache_usage <= 1.0
        assert report.tokens_per_second >= 0.0


def _tokens(chunks: list[Chunk]) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


async def _aclose(stream: AsyncIterator[Chunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _steps(engine: Engine) -> int | None:
    steps: int | None = getattr(engine, "steps_executed", None)
    return steps


async def _assert_no_more_steps(engine: Engine) -> None:
    steps = _steps(engine)
    if steps is None:
        return
    await asyncio.sleep(0.2)
    assert steps == _steps(engine), "the engine kept stepping after the request stopped"
