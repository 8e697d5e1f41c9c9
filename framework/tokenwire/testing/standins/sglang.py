"""A stand-in for SGLang's gRPC mode: ``sglang.grpc.scheduler.SglangScheduler`` over any engine.

Not SGLang: a test double generated from the engine's own proto (the
``smg-grpc-proto`` stubs) that answers as the servicer SGLang's gRPC mode runs
(lightseekorg/smg, ``grpc_servicer/smg_grpc_servicer/sglang/servicer.py``,
``request_manager.py``, ``health_servicer.py``, ``utils.py``), so the gateway's
client can be tested without a GPU:

* Generate takes token ids only (no ``tokenized``: INVALID_ARGUMENT) and checks
  its sampling fields as SGLang's ``SamplingParams.verify`` does (``top_p`` in
  (0, 1], ``top_k`` -1 or at least 1: proto3's zero defaults are refused); an
  unset ``max_new_tokens`` is SGLang's default 128, and one past the context is
  cut to fit. With ``stream`` it sends each step's *new* ids as a
  ``GenerateStreamChunk`` (counts cumulative); the last chunk is followed by a
  ``GenerateComplete`` whose ``output_ids`` repeat *that chunk's* ids, with
  ``stop`` / ``length`` / ``abort`` and ``matched_token_id``. The scheduler's ids
  come untrimmed: a matched stop token (``stop_token_ids``, and the model's EOS
  unless ``ignore_eos``) is sent as the last token.
* Abort (one request id) answers success and ends that request's stream with
  INTERNAL "Request aborted" (the scheduler's abort, through
  ``abort_code_from_output``); a cancelled call stops the engine's work too.
* Errors: a bad request INVALID_ARGUMENT; the engine refusing for capacity, or
  every request while ``queue_full`` is set, is the scheduler's full queue
  (``_abort_on_queued_limit``: HTTP 503, so UNAVAILABLE "The request queue is
  full."); other failures INTERNAL.
* GetLoads reports one data-parallel rank from the engine's ``load()``; tests
  read ``load_calls`` and ``health_checks`` (HealthCheck RPCs) to see the polls.
* The ``HealthCheck`` RPC waits ``health_check_delay_s`` (the real one polls for
  its one-token request once a second); the standard ``grpc.health.v1`` service
  answers at once, NOT_SERVING once ``shutting_down`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from tokenwire.backend import Engine, FinishReason, GenerateRequest, SamplingParams
from tokenwire.errors import InvalidArgumentError, ResourceExhaustedError
from tokenwire.testing.standins.common import EngineRunner
from tokenwire.worker.protocol import scheduler_load

__all__ = ["SCHEDULER_SERVICE_NAME", "SglangHealthStandin", "SglangStandin"]

SCHEDULER_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SglangScheduler"].full_name
Context = grpc.aio.ServicerContext[Any, Any]
_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams default
_QUEUE_FULL = "The request queue is full."  # the scheduler's message, sent as details
_LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})
_WIRE_REASON = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "abort",
}


def _verify(params: pb.SamplingParams) -> None:
    """SGLang's own checks of the fields as sent (its messages)."""
    if params.temperature < 0:
        raise InvalidArgumentError(f"temperature must be non-negative, got {params.temperature}.")
    if not 0 < params.top_p <= 1:
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {params.top_p}.")
    if params.top_k < -1 or params.top_k == 0:
        raise InvalidArgumentError(
            f"top_k must be -1 (disable), or at least 1, got {params.top_k}."
        )
    if not 0 <= params.min_p <= 1:
        raise InvalidArgumentError(f"min_p must be in [0, 1], got {params.min_p}.")
    if not 0 <= params.repetition_penalty <= 2:
        raise InvalidArgumentError(
            f"repetition_penalty must be in [0, 2], got {params.repetition_penalty}."
        )


class SglangStandin(pb_grpc.SglangSchedulerServicer):  # type: ignore[misc]
    """SglangScheduler over ``engine``, as SGLang's gRPC mode answers (a stand-in)."""

    def __init__(
        self,
        engine: Engine,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
        health_check_delay_s: float = 1.0,
    ) -> None:
        self.runner = EngineRunner(engine)
        self._eos = eos_token_ids
        self._health_delay = health_check_delay_s
        self._started = time.time()
        self._last_receive = 0.0
        self.shutting_down = False  # set: health NOT_SERVING, HealthCheck unhealthy
        self.queue_full = False  # set: Generate refuses as at --max-queued-requests
        self.load_calls = 0  # GetLoads calls answered
        self.health_checks = 0  # HealthCheck RPCs received
        self.requests: list[pb.GenerateRequest] = []  # every Generate, as received
        self.abort_calls: list[str] = []  # every Abort's request id, as received

    def _job(self, request: pb.GenerateRequest) -> tuple[GenerateRequest, frozenset[int]]:
        if not request.HasField("tokenized"):
            raise InvalidArgumentError("Tokenized input must be provided")
        prompt = tuple(request.tokenized.input_ids)
        params = request.sampling_params
        _verify(params)
        if params.n > 1:
            raise InvalidArgumentError("the stand-in generates one sample (n <= 1)")
        context_length = self.runner.engine.capabilities.context_length
        if not prompt or len(prompt) >= context_length:
            raise InvalidArgumentError(
                f"The input ({len(prompt)} tokens) is empty or longer than the model's "
                f"context length ({context_length} tokens)."
            )
        wanted = (
            params.max_new_tokens if params.HasField("max_new_tokens") else _DEFAULT_MAX_NEW_TOKENS
        )
        max_tokens = min(wanted, context_length - len(prompt))  # the scheduler's clamp
        if max_tokens < 1:
            raise InvalidArgumentError("the stand-in needs max_new_tokens >= 1")
        sampling = SamplingParams(
            temperature=params.temperature, top_p=params.top_p, top_k=max(0, params.top_k)
        )
        stops = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= self._eos
        return GenerateRequest(request.request_id, prompt, max_tokens, sampling), stops

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.requests.append(request)
        self._last_receive = time.time()
        request_id = request.request_id
        try:
            job, stops = self._job(request)
            if self.queue_full:
                raise ResourceExhaustedError(_QUEUE_FULL)
            prompt_tokens = len(job.prompt_token_ids)
            output: list[int] = []
            steps = self.runner.steps(job, stops=stops, keep_stop=True)
            async with contextlib.aclosing(steps):
                async for step in steps:
                    if step.finish == FinishReason.CANCELLED:
                        # The scheduler's AbortReq reaches the stream as an error output.
                        await context.abort(grpc.StatusCode.INTERNAL, "Request aborted")
                    output.extend(step.token_ids)
                    if request.stream:
                        yield pb.GenerateResponse(
                            request_id=request_id,
                            chunk=pb.GenerateStreamChunk(
                                token_ids=step.token_ids,
                                prompt_tokens=prompt_tokens,
                                completion_tokens=len(output),
                            ),
                        )
                    if step.finish is None:
                        continue
                    complete = pb.GenerateComplete(
                        # Streamed: the last output's ids again; otherwise every id.
                        output_ids=step.token_ids if request.stream else output,
                        finish_reason=_WIRE_REASON.get(step.finish, "stop"),
                        prompt_tokens=prompt_tokens,
                        completion_tokens=len(output),
                    )
                    if step.matched is not None:
                        complete.matched_token_id = step.matched
                    yield pb.GenerateResponse(request_id=request_id, complete=complete)
                    return
        except grpc.aio.AbortError:
            raise
        except (InvalidArgumentError, ValueError) as exc:
            message = exc.message if isinstance(exc, InvalidArgumentError) else str(exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        except ResourceExhaustedError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _QUEUE_FULL)
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))

    async def Abort(self, request: pb.AbortRequest, context: Context) -> pb.AbortResponse:
        self.abort_calls.append(request.request_id)
        # The servicer reports success once the abort reached the scheduler, found or not.
        self.runner.abort(request.request_id)
        return pb.AbortResponse(success=True, message=f"Request {request.request_id} aborted")

    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: Context
    ) -> pb.HealthCheckResponse:
        self.health_checks += 1
        if self.shutting_down:
            return pb.HealthCheckResponse(healthy=False, message="Server is shutting down")
        await asyncio.sleep(self._health_delay)
        return pb.HealthCheckResponse(healthy=True, message="Health check passed")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        caps = self.runner.engine.capabilities
        return pb.GetModelInfoResponse(
            model_path=caps.model,
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
            active_requests=len(self.runner.running),
            is_paused=False,
            last_receive_timestamp=self._last_receive,
            uptime_seconds=time.time() - self._started,
            sglang_version="stand-in",
            server_type="grpc",
        )

    async def GetLoads(self, request: pb.GetLoadsRequest, context: Context) -> pb.GetLoadsResponse:
        self.load_calls += 1
        invalid = set(request.include) - _LOAD_SECTIONS
        if invalid:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Invalid include sections: {sorted(invalid)}. "
                f"Valid options: {sorted(_LOAD_SECTIONS)}",
            )
        engine = self.runner.engine
        report = engine.load()
        load = scheduler_load(report, engine.capabilities.max_batch, pb.SchedulerLoad)
        load.dp_rank = 0
        loads = [] if request.HasField("dp_rank") and request.dp_rank != 0 else [load]
        return pb.GetLoadsResponse(
            timestamp=datetime.now(UTC).isoformat(),
            version="stand-in",
            dp_rank_count=len(loads),
            loads=loads,
            aggregate=pb.AggregateMetrics(
                total_running_reqs=sum(x.num_running_reqs for x in loads),
                total_waiting_reqs=sum(x.num_waiting_reqs for x in loads),
                total_reqs=sum(x.num_total_reqs for x in loads),
            ),
        )

    async def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: Context
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        chunks = await self.runner.tokenizer_chunks()
        if not chunks:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "Tokenizer path is not configured on this server.",
            )
        for data, digest in chunks:
            yield common_pb2.GetTokenizerChunk(data=data, sha256=digest)


class SglangHealthStandin(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1.Health`` as SGLang's gRPC mode runs it beside the scheduler:
    the server ("") and the scheduler service are SERVING until shutdown."""

    def __init__(self, scheduler: SglangStandin) -> None:
        self._scheduler = scheduler

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SCHEDULER_SERVICE_NAME):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Unknown service: {request.service}")
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if self._scheduler.shutting_down
            else health_pb2.HealthCheckResponse.SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        yield await self.Check(request, context)  # the current status once, as SGLang's
