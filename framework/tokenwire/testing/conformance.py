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

The engine must be idle between tests (nothing else generating on it): the
suite reads ``load()`` to see its own requests come and go. Override
``prompt_ids`` when the engine needs particular token ids; whatever it returns
must make greedy decoding answer with at least :data:`LONG_ANSWER` tokens before
the engine would stop on its own, so that ``max_tokens`` is what ends the
answers. The engine awaits between decode steps (a real one waits for its
model), so a consumer's task can be cancelled mid-answer.

Every check runs for every engine; an engine that also counts its decode steps
in ``steps_executed`` is held, in addition, to taking none after a request
stopped.

Each test method is a check that raises :class:`AssertionError` when the engine
breaks the contract, so it can also be called directly on an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Hashable, Sequence
from typing import Any, TypeVar

import pytest

from tokenwire.backend import (
    Chunk,
    Engine,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    TextBackend,
)

__all__ = ["LONG_ANSWER", "EngineConformance", "collect"]

LONG_ANSWER = 8  # tokens the conformance prompt must be answered with, at least
_QUIET_S = 0.2  # how long an engine with a step counter is watched for stray steps
_SEEDED: dict[str, Any] = {"temperature": 1.0, "top_p": 0.9, "seed": 1234}
_request_ids = itertools.count()
T = TypeVar("T", bound=Hashable)


async def collect(engine: Engine, request: GenerateRequest) -> list[Chunk]:
    """All chunks of one request."""
    return [chunk async for chunk in engine.generate(request)]


class EngineConformance:
    """Behaviour the framework relies on from every :class:`~tokenwire.backend.Engine`."""

    settle_s = 5.0  # how long a cancelled request may take to leave load(); CPU CI is slow

    @pytest.fixture
    def prompt_ids(self) -> list[int]:
        """A short prompt; the ids are valid in any vocabulary of 256+ tokens."""
        return list(b"Say something.")

    def request(
        self,
        prompt: list[int],
        max_tokens: int = LONG_ANSWER,
        *,
        stop_token_ids: frozenset[int] = frozenset(),
        **sampling: Any,
    ) -> GenerateRequest:
        """A request with a fresh id for ``prompt``."""
        return GenerateRequest(
            request_id=f"conformance-{next(_request_ids)}",
            prompt_token_ids=prompt,
            max_tokens=max_tokens,
            sampling=SamplingParams(**sampling),
            stop_token_ids=stop_token_ids,
        )

    async def test_satisfies_the_engine_protocol(self, engine: Engine) -> None:
        """The engine has every member of the Engine protocol and sane capabilities."""
        assert isinstance(engine, Engine)
        assert engine.capabilities.model
        assert engine.capabilities.context_length > LONG_ANSWER
        assert engine.capabilities.max_batch >= 1

    async def test_stream_shape(self, engine: Engine, prompt_ids: list[int]) -> None:
        """Every chunk but the last has tokens; the last finishes with exact counts."""
        chunks = await collect(engine, self.request(prompt_ids))
        assert chunks, "the engine yielded no chunk at all"
        *body, last = chunks
        assert all(chunk.token_ids for chunk in body), "a chunk before the last had no tokens"
        assert [None] * len(body) == [chunk.finish_reason for chunk in body]
        assert last.finish_reason is not None, "the last chunk has no finish_reason"
        assert (len(prompt_ids), len(_tokens(chunks))) == (
            last.prompt_tokens,
            last.completion_tokens,
        )

    @pytest.mark.parametrize("max_tokens", [1, LONG_ANSWER])
    async def test_max_tokens_ends_the_answer_with_length(
        self, engine: Engine, prompt_ids: list[int], max_tokens: int
    ) -> None:
        """With no stop token in reach, exactly max_tokens tokens come and LENGTH ends them."""
        chunks = await collect(engine, self.request(prompt_ids, max_tokens))
        last = chunks[-1]
        assert (max_tokens, FinishReason.LENGTH, max_tokens) == (
            len(_tokens(chunks)),
            last.finish_reason,
            last.completion_tokens,
        )

    async def test_stop_token_ends_the_answer_and_is_not_returned(
        self, engine: Engine, prompt_ids: list[int]
    ) -> None:
        """A stop token id ends the answer before it with STOP; the stop token is not sent."""
        reference = _tokens(await collect(engine, self.request(prompt_ids)))
        assert LONG_ANSWER == len(reference), "the prompt must give a long answer"
        stop = _latest_first_occurrence(reference)
        expected = reference[: reference.index(stop)]
        chunks = await collect(engine, self.request(prompt_ids, stop_token_ids=frozenset({stop})))
        assert (expected, FinishReason.STOP, len(expected)) == (
            _tokens(chunks),
            chunks[-1].finish_reason,
            chunks[-1].completion_tokens,
        )

    @pytest.mark.parametrize("stop", [False, True])
    async def test_nothing_follows_the_final_chunk(
        self, engine: Engine, prompt_ids: list[int], stop: bool
    ) -> None:
        """After the chunk with the finish reason the stream ends, and the request is gone."""
        stop_token_ids: frozenset[int] = frozenset()
        if stop:
            reference = _tokens(await collect(engine, self.request(prompt_ids)))
            stop_token_ids = frozenset({_latest_first_occurrence(reference)})
        await _until_idle(engine, self.settle_s)
        stream = engine.generate(self.request(prompt_ids, stop_token_ids=stop_token_ids))
        try:
            while (await anext(stream)).finish_reason is None:
                pass
            assert [] == [chunk async for chunk in stream], "chunks came after the final one"
            # No await between the end of the stream and this look: an engine that
            # still holds (or steps) the request after its final chunk is caught here.
            assert (0, 0) == (engine.load().running, engine.load().queued)
            await _assert_no_more_steps(engine)
        finally:
            await _aclose(stream)

    async def test_greedy_is_deterministic(self, engine: Engine, prompt_ids: list[int]) -> None:
        """Temperature 0 gives the same tokens every time."""
        first = await collect(engine, self.request(prompt_ids, 6))
        second = await collect(engine, self.request(prompt_ids, 6))
        assert 6 == len(_tokens(first))
        assert _tokens(first) == _tokens(second)

    async def test_seeded_sampling_is_reproducible(
        self, engine: Engine, prompt_ids: list[int]
    ) -> None:
        """The same seed and params give the same tokens."""
        first = await collect(engine, self.request(prompt_ids, 6, **_SEEDED))
        second = await collect(engine, self.request(prompt_ids, 6, **_SEEDED))
        assert _tokens(first), "sampling gave no tokens"
        assert _tokens(first) == _tokens(second)

    async def test_aclose_stops_the_work(self, engine: Engine, prompt_ids: list[int]) -> None:
        """Closing the stream after one chunk takes the request out of load()."""
        await _until_idle(engine, self.settle_s)
        stream = engine.generate(self.request(prompt_ids, 200))
        try:
            first = await anext(stream)
            assert first.token_ids
            assert first.finish_reason is None
            assert 1 == _in_flight(engine), "load() does not count a generating request"
        finally:
            await _aclose(stream)
        await _until_idle(engine, self.settle_s)
        await _assert_no_more_steps(engine)

    async def test_task_cancel_stops_the_work(self, engine: Engine, prompt_ids: list[int]) -> None:
        """Cancelling the consuming task takes the request out of load()."""
        await _until_idle(engine, self.settle_s)
        got_one = asyncio.Event()
        counted: list[int] = []

        async def consume() -> None:
            async for _ in engine.generate(self.request(prompt_ids, 200)):
                if not got_one.is_set():
                    counted.append(_in_flight(engine))
                    got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), 60)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled(), (
            "the answer ended before the cancel: the engine never let the event loop run"
        )
        assert [1] == counted, "load() does not count a generating request"
        await _until_idle(engine, self.settle_s)
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
        assert 5 == len(solo[0])
        assert solo == [_tokens(chunks) for chunks in together]

    async def test_load_report_is_in_range(self, engine: Engine) -> None:
        """An idle engine reports no running work and a KV-cache use in [0, 1]."""
        await _until_idle(engine, self.settle_s)
        report = engine.load()
        assert (0, 0) == (report.running, report.queued)
        assert 0.0 <= report.kv_cache_usage <= 1.0
        assert report.tokens_per_second >= 0.0


def _tokens(chunks: list[Chunk]) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


def _latest_first_occurrence(tokens: Sequence[T]) -> T:
    """The token (or character) that appears for the first time latest in ``tokens``.

    Stopping on it leaves the longest answer before the stop, so an engine that
    stops too early is caught too.
    """
    seen: set[T] = set()
    latest = tokens[0]
    for token in tokens:
        if token not in seen:
            seen.add(token)
            latest = token
    return latest


def _in_flight(engine: Engine | TextBackend) -> int:
    report = engine.load()
    return report.running + report.queued


async def _until_idle(engine: Engine, limit_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while _in_flight(engine):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"engine still busy after its requests ended: {engine.load()}")
        await asyncio.sleep(0.01)


async def _aclose(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def _assert_no_more_steps(engine: Engine) -> None:
    """For an engine that counts its decode steps: none happen once its requests ended."""
    steps = getattr(engine, "steps_executed", None)
    if steps is None:  # the load() checks are what hold such an engine to the contract
        return
    await asyncio.sleep(_QUIET_S)
    assert steps == getattr(engine, "steps_executed", None), (
        "the engine kept stepping after the request stopped"
    )
