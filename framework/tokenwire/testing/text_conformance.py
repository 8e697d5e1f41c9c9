"""The conformance suite every text backend passes: subclass it in a test module.

    from tokenwire.testing.text_conformance import TextBackendConformance

    class TestMyBackend(TextBackendConformance):
        @pytest.fixture
        def backend(self, my_backend):
            return my_backend

The text-level twin of :mod:`tokenwire.testing.conformance`: the same contract
(stream shape, max_tokens, stop strings, determinism, cancellation within a step,
concurrency, load reports) for backends that take messages and yield text. The
backend must be idle between tests. Override ``messages`` when the backend needs
a particular prompt; greedy decoding must answer it with at least
:data:`LONG_ANSWER` tokens before stopping on its own. Override
``upstream_in_flight`` to also check that the server behind the backend stopped
working on a cancelled request (not only that the backend forgot it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

import pytest

from tokenwire.backend import (
    ChatMessage,
    FinishReason,
    SamplingParams,
    TextBackend,
    TextChunk,
    TextRequest,
)
from tokenwire.testing.conformance import _aclose, _in_flight, _latest_first_occurrence

__all__ = ["LONG_ANSWER", "TextBackendConformance", "collect_text"]

LONG_ANSWER = 8
_request_ids = itertools.count()


async def collect_text(backend: TextBackend, request: TextRequest) -> list[TextChunk]:
    """All chunks of one request."""
    return [chunk async for chunk in backend.generate_text(request)]


def _text(chunks: list[TextChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


class TextBackendConformance:
    """Behaviour the framework relies on from every :class:`~tokenwire.backend.TextBackend`."""

    settle_s = 5.0  # how long a cancelled request may take to leave load()

    @pytest.fixture
    def messages(self) -> list[ChatMessage]:
        """A short conversation."""
        return [ChatMessage("user", "Say something.")]

    @pytest.fixture
    def upstream_in_flight(self) -> Callable[[], int] | None:
        """Requests the server behind the backend still works on (None: not observable)."""
        return None

    def request(
        self,
        messages: list[ChatMessage],
        max_tokens: int = LONG_ANSWER,
        *,
        stop: tuple[str, ...] = (),
        **sampling: float | int,
    ) -> TextRequest:
        """A request with a fresh id."""
        return TextRequest(
            request_id=f"text-conformance-{next(_request_ids)}",
            messages=messages,
            max_tokens=max_tokens,
            sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
            stop=stop,
        )

    async def test_satisfies_the_text_backend_protocol(self, backend: TextBackend) -> None:
        """The backend has every member of the TextBackend protocol and sane capabilities."""
        assert isinstance(backend, TextBackend)
        assert backend.capabilities.model
        assert backend.capabilities.context_length > LONG_ANSWER
        assert backend.capabilities.max_batch >= 1

    async def test_stream_shape(self, backend: TextBackend, messages: list[ChatMessage]) -> None:
        """Every chunk but the last has text; the last finishes with the counts of the rest."""
        chunks = await collect_text(backend, self.request(messages))
        assert chunks, "the backend yielded no chunk at all"
        *body, last = chunks
        assert all(chunk.text for chunk in body), "a chunk before the last had no text"
        assert [None] * len(body) == [chunk.finish_reason for chunk in body]
        assert last.finish_reason is not None, "the last chunk has no finish_reason"
        assert sum(c.token_count for c in chunks) == last.completion_tokens

    @pytest.mark.parametrize("max_tokens", [1, LONG_ANSWER])
    async def test_max_tokens_ends_the_answer_with_length(
        self, backend: TextBackend, messages: list[ChatMessage], max_tokens: int
    ) -> None:
        """With no stop in reach, max_tokens tokens come and LENGTH ends them."""
        chunks = await collect_text(backend, self.request(messages, max_tokens))
        last = chunks[-1]
        assert (FinishReason.LENGTH, max_tokens) == (last.finish_reason, last.completion_tokens)
        assert _text(chunks)

    async def test_a_stop_string_ends_the_answer_and_is_not_returned(
        self, backend: TextBackend, messages: list[ChatMessage]
    ) -> None:
        """A stop string cuts the answer where it first appears, with STOP."""
        full = _text(await collect_text(backend, self.request(messages, 2 * LONG_ANSWER)))
        stop = _latest_first_occurrence(full)
        cut = full[: full.index(stop)]
        chunks = await collect_text(backend, self.request(messages, 2 * LONG_ANSWER, stop=(stop,)))
        assert (cut, FinishReason.STOP) == (_text(chunks), chunks[-1].finish_reason)

    async def test_greedy_is_deterministic(
        self, backend: TextBackend, messages: list[ChatMessage]
    ) -> None:
        """Temperature 0 gives the same text every time."""
        first = _text(await collect_text(backend, self.request(messages)))
        second = _text(await collect_text(backend, self.request(messages)))
        assert first == second

    async def test_aclose_stops_the_work(
        self,
        backend: TextBackend,
        messages: list[ChatMessage],
        upstream_in_flight: Callable[[], int] | None,
    ) -> None:
        """Closing the stream after one chunk takes the request out of load() and upstream."""
        await self._until_idle(backend, upstream_in_flight)
        stream = backend.generate_text(self.request(messages, 500))
        try:
            first = await anext(stream)
            assert first.text
            assert 1 == _in_flight(backend), "load() does not count a generating request"
        finally:
            await _aclose(stream)
        await self._until_idle(backend, upstream_in_flight)

    async def test_task_cancel_stops_the_work(
        self,
        backend: TextBackend,
        messages: list[ChatMessage],
        upstream_in_flight: Callable[[], int] | None,
    ) -> None:
        """Cancelling the consuming task takes the request out of load() and upstream."""
        await self._until_idle(backend, upstream_in_flight)
        got_one = asyncio.Event()

        async def consume() -> None:
            async for _ in backend.generate_text(self.request(messages, 500)):
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), 60)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled(), "the answer ended before the cancel"
        await self._until_idle(backend, upstream_in_flight)

    async def test_concurrent_requests_match_solo_runs(
        self, backend: TextBackend, messages: list[ChatMessage]
    ) -> None:
        """Two greedy requests at once each get the text they get alone."""
        other = [*messages[:-1], ChatMessage(messages[-1].role, messages[-1].content + " Now.")]
        pair = (messages, other)
        solo = [_text(await collect_text(backend, self.request(m, 5))) for m in pair]
        together = await asyncio.gather(*(collect_text(backend, self.request(m, 5)) for m in pair))
        assert solo == [_text(chunks) for chunks in together]

    async def test_load_report_is_in_range(self, backend: TextBackend) -> None:
        """An idle backend reports no running work and a KV-cache use in [0, 1]."""
        await self._until_idle(backend, None)
        report = backend.load()
        assert (0, 0) == (report.running, report.queued)
        assert 0.0 <= report.kv_cache_usage <= 1.0
        assert report.tokens_per_second >= 0.0

    async def _until_idle(
        self, backend: TextBackend, upstream_in_flight: Callable[[], int] | None
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_s
        while _in_flight(backend) or (upstream_in_flight is not None and upstream_in_flight()):
            if loop.time() > deadline:
                upstream = upstream_in_flight() if upstream_in_flight is not None else "n/a"
                raise AssertionError(
                    f"still busy after its requests ended: {backend.load()}, upstream {upstream}"
                )
            await asyncio.sleep(0.01)
