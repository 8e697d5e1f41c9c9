"""What both stand-ins share: running engine requests the way an engine server does.

A real TensorRT-LLM or SGLang server matches stop tokens in its own scheduler and
aborts requests by id; the stand-ins do the same over any
:class:`~tokenwire.backend.Engine`, so that each can then put the outcome into
its protocol's messages exactly as the real server does (whether the stop token
is sent, what the final message repeats, which status an abort ends with).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace

from tokenwire.backend import Engine, FinishReason, GenerateRequest
from tokenwire.worker.tokenizer_files import chunks_of, pack_tokenizer

__all__ = ["EngineRunner", "Step"]


@dataclass(frozen=True, slots=True)
class Step:
    """New output tokens of one request; ``finish`` set on its last step, and
    ``matched`` naming the stop token that ended it (when one did)."""

    token_ids: tuple[int, ...]
    finish: FinishReason | None = None
    matched: int | None = None


@dataclass(slots=True)
class _Running:
    task: asyncio.Task[object] | None
    waiting: bool = False  # suspended on the engine: an abort may cancel it there
    aborted: bool = False
    output: list[int] = field(default_factory=list)


class EngineRunner:
    """Runs requests on ``engine`` for a stand-in server, and keeps what tests check:
    ``aborted`` (ids that Abort named while they ran), ``cancelled`` (ids that
    ended without a finish: the client left, or the engine failed) and ``finished``
    (id → how it ended)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.running: dict[str, _Running] = {}
        self.aborted: list[str] = []
        self.cancelled: list[str] = []
        self.finished: dict[str, FinishReason] = {}
        self._archive: asyncio.Future[bytes] | None = None

    def output(self, request_id: str) -> list[int]:
        """Every output token of a running request so far."""
        return self.running[request_id].output

    async def steps(
        self, job: GenerateRequest, *, stops: frozenset[int], keep_stop: bool
    ) -> AsyncGenerator[Step, None]:
        """Run ``job`` (its own stop ids unused: the server matches ``stops`` itself)
        and yield its steps; the matched stop token is part of the output when
        ``keep_stop``. An abort by id ends it with a CANCELLED step; a cancelled
        call closes the engine's stream, which stops its work within a step."""
        if job.request_id in self.running:
            raise ValueError(f"request {job.request_id!r} is already running")
        running = _Running(asyncio.current_task())
        self.running[job.request_id] = running
        stream = self.engine.generate(replace(job, stop_token_ids=frozenset()))
        try:
            while True:
                running.waiting = True
                try:
                    chunk = await anext(stream)
                except asyncio.CancelledError:
                    task = running.task
                    if running.aborted and task is not None and task.uncancel() == 0:
                        yield self._end(job, Step((), FinishReason.CANCELLED))
                        return
                    raise
                finally:
                    running.waiting = False
                ids = chunk.token_ids
                cut = next((i for i, token in enumerate(ids) if token in stops), None)
                if cut is not None:
                    kept = ids[: cut + 1] if keep_stop else ids[:cut]
                    running.output.extend(kept)
                    yield self._end(job, Step(kept, FinishReason.STOP, ids[cut]))
                    return
                running.output.extend(ids)
                if chunk.finish_reason is not None:
                    yield self._end(job, Step(ids, chunk.finish_reason))
                    return
                yield Step(ids)
                if running.aborted:
                    yield self._end(job, Step((), FinishReason.CANCELLED))
                    return
        finally:
            self.running.pop(job.request_id, None)
            if job.request_id not in self.finished:  # the client left, or the engine failed
                self.cancelled.append(job.request_id)
            await stream.aclose()  # type: ignore[attr-defined]

    def _end(self, job: GenerateRequest, step: Step) -> Step:
        assert step.finish is not None
        self.finished[job.request_id] = step.finish
        return step

    def abort(self, request_id: str) -> bool:
        """Stop a running request within a step; False when none runs by that id."""
        running = self.running.get(request_id)
        if running is None or running.aborted:
            return False
        running.aborted = True
        self.aborted.append(request_id)
        if running.waiting and running.task is not None:
            running.task.cancel()  # wakes it from the engine's step
        return True

    async def tokenizer_chunks(self) -> list[tuple[bytes, str]]:
        """The engine's tokenizer as GetTokenizer's ``(data, sha256)`` pieces (the
        zip built once); empty when the engine names no tokenizer."""
        source = self.engine.capabilities.tokenizer
        if source is None:
            return []
        if self._archive is None:
            self._archive = asyncio.ensure_future(asyncio.to_thread(pack_tokenizer, source))
        return list(chunks_of(await asyncio.shield(self._archive)))
