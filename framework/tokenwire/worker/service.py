"""``vllm.grpc.engine.VllmEngine`` served over one engine: what a worker answers.

Generate streams every token that is ready since the last message as one
``GenerateStreamChunk`` (a slow reader gets fewer, larger messages), then one
``GenerateComplete`` with the finish reason, the counts and all output ids.
Abort stops requests by id within one engine step (a stream whose client left is
stopped the same way). Errors keep their status codes: a refusal for capacity is
RESOURCE_EXHAUSTED, so a router knows to try another worker.

Embed, FlushCache, profiling and KV events are left UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from tokenwire.backend import Chunk, Engine, FinishReason
from tokenwire.errors import TokenwireError, status_of
from tokenwire.logs import get_logger
from tokenwire.metrics.registry import Metrics
from tokenwire.streams import Pending, poll_next, wait_set
from tokenwire.tracing.spans import Tracing
from tokenwire.worker.protocol import (
    complete_message,
    message_interval_of,
    request_of,
    scheduler_load,
)
from tokenwire.worker.tokenizer_files import chunks_of

__all__ = ["EngineServicer"]

_log = get_logger("tokenwire.worker")
Context = grpc.aio.ServicerContext[Any, Any]
_MERGE_LIMIT = 64  # engine chunks one message takes in when they are all ready


@dataclass(slots=True)
class _Running:
    task: asyncio.Task[object] | None
    waiting: bool = False  # suspended on the engine (an abort cancels it there)
    aborted: bool = False
    output: list[int] = field(default_factory=list)


class EngineServicer(pb_grpc.VllmEngineServicer):  # type: ignore[misc]
    """The engine protocol over ``engine``; ``archive`` builds the tokenizer's zip."""

    def __init__(
        self,
        engine: Engine,
        *,
        eos_token_ids: frozenset[int],
        archive: Callable[[], Awaitable[bytes]],
        model_path: str = "",
        message_interval_s: float = 0.0,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._tracing = tracing
        self._interval = message_interval_s
        self._eos = eos_token_ids
        self._archive = archive
        self._model_path = model_path
        self._running: dict[str, _Running] = {}
        self._started = time.time()
        self._last_request = 0.0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def active(self) -> int:
        """Generate streams running now."""
        return len(self._running)

    async def wait_idle(self, limit_s: float) -> bool:
        """Until no Generate stream runs; False after ``limit_s``."""
        return await wait_set(self._idle, limit_s)

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is draining")
        caps = self._engine.capabilities
        metadata = tuple(context.invocation_metadata() or ())
        try:
            job = request_of(
                request,
                context_length=caps.context_length,
                eos_token_ids=self._eos,
                metadata=metadata,
            )
            interval = message_interval_of(metadata, self._interval)
        except TokenwireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        if job.request_id in self._running:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request {job.request_id!r} is already running"
            )
        self._last_request = time.time()
        spans: tuple[Any, Any] | None = None
        if self._tracing is not None:  # continues the gateway's trace, if it sent one
            worker_span = self._tracing.start(
                "tokenwire.worker", metadata, {"request.id": job.request_id}
            )
            engine_span = self._tracing.start(
                "tokenwire.engine",
                self._tracing.inject(worker_span),
                {"engine.prompt_tokens": len(job.prompt_token_ids)},
            )
            spans = (worker_span, engine_span)
        running = _Running(asyncio.current_task())
        self._running[job.request_id] = running
        self._idle.clear()
        stream = self._engine.generate(job)
        pending: Pending[Chunk] | None = None
        loop = asyncio.get_running_loop()
        sent_at = 0.0  # when this stream's last message went out (0: none yet)
        try:
            while True:
                running.waiting = True
                if sent_at and interval:
                    # Not sooner than the interval after the last message: what the
                    # engine makes meanwhile rides in the next one.
                    wait = sent_at + interval - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                try:
                    chunk = await (pending if pending is not None else stream.__anext__())
                except StopAsyncIteration:
                    await context.abort(
                        grpc.StatusCode.INTERNAL, "the engine ended without a finish"
                    )
                finally:
                    running.waiting = False
                    pending = None
                tokens = list(chunk.token_ids)
                merged = 1
                failure: Exception | None = None
                while chunk.finish_reason is None and merged < _MERGE_LIMIT:
                    try:
                        ready, item = poll_next(stream)
                    except Exception as exc:  # send what came before it, then fail
                        failure = exc
                        break
                    if not ready:
                        pending = item  # type: ignore[assignment]
                        break
                    chunk = item  # type: ignore[assignment]
                    tokens.extend(chunk.token_ids)
                    merged += 1
                running.output.extend(tokens)
                if tokens and request.stream:
                    yield pb.GenerateResponse(
                        chunk=pb.GenerateStreamChunk(
                            token_ids=tokens,
                            prompt_tokens=len(job.prompt_token_ids),
                            completion_tokens=len(running.output),
                        )
                    )
                    sent_at = loop.time()
                if failure is not None:
                    raise failure
                if chunk.finish_reason is not None:
                    self._count(chunk.finish_reason.value)
                    yield complete_message(chunk, running.output)
                    return
                if running.aborted:
                    self._count("cancelled")
                    yield self._aborted(job.prompt_token_ids, running)
                    return
        except asyncio.CancelledError:
            task = running.task
            self._count("cancelled")
            if running.aborted and task is not None and task.uncancel() == 0:
                yield self._aborted(job.prompt_token_ids, running)
                return
            raise  # the client left: closing the engine stream below stops its work
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the engine's own errors keep their status; others: INTERNAL
            self._count("error")
            if not isinstance(exc, TokenwireError):
                _log.exception("engine failed", request_id=job.request_id)
            code, message, _ = status_of(exc)
            await context.abort(grpc.StatusCode[code.name], message)
        finally:
            if spans is not None:
                spans[1].set_attribute("engine.completion_tokens", len(running.output))
                for span in reversed(spans):
                    span.end()
            if pending is not None:
                await pending.abandon()
            del self._running[job.request_id]
            if not self._running:
                self._idle.set()
            await stream.aclose()  # type: ignore[attr-defined]

    def _count(self, finish_reason: str) -> None:
        if self._metrics is not None:
            self._metrics.worker_requests.labels(finish_reason).inc()

    @staticmethod
    def _aborted(prompt: Sequence[int], running: _Running) -> pb.GenerateResponse:
        end = Chunk((), FinishReason.CANCELLED, len(prompt), len(running.output))
        return complete_message(end, running.output)

    async def Abort(self, request: pb.AbortRequest, context: Context) -> pb.AbortResponse:
        for request_id in request.request_ids:
            running = self._running.get(request_id)
            if running is None or running.aborted:
                continue
            running.aborted = True
            if running.waiting and running.task is not None:
                running.task.cancel()  # wakes it from the engine's step
        return pb.AbortResponse()

    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: Context
    ) -> pb.HealthCheckResponse:
        if self.draining:
            return pb.HealthCheckResponse(healthy=False, message="draining")
        return pb.HealthCheckResponse(healthy=True, message="ok")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        caps = self._engine.capabilities
        return pb.GetModelInfoResponse(
            model_path=self._model_path or caps.model,
            served_model_name=caps.model,
            is_generation=True,
            max_context_length=caps.context_length,
            max_req_input_len=caps.context_length - 1,
            eos_token_ids=sorted(self._eos),
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Context
    ) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(
            active_requests=len(self._running),
            is_paused=self.draining,
            last_receive_timestamp=self._last_request,
            uptime_seconds=time.time() - self._started,
            server_type="tokenwire-worker",
            data_parallel_size=1,
            max_num_seqs=self._engine.capabilities.max_batch,
        )

    async def GetLoads(self, request: pb.GetLoadsRequest, context: Context) -> pb.GetLoadsResponse:
        load = scheduler_load(self._engine.load(), self._engine.capabilities.max_batch)
        return pb.GetLoadsResponse(
            timestamp=f"{time.time():.6f}", version="1", dp_rank_count=1, loads=[load]
        )

    async def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: Context
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        archive = await self._archive()
        for data, digest in chunks_of(archive):
            yield common_pb2.GetTokenizerChunk(data=data, sha256=digest)
