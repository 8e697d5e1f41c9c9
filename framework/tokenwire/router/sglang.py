"""The engine client for SGLang's ``sglang.grpc.scheduler.SglangScheduler`` (gRPC mode).

What the real server does, and this client relies on (lightseekorg/smg, whose
``grpc_servicer/smg_grpc_servicer/sglang/`` is the servicer SGLang's gRPC mode
runs: ``servicer.py``, ``request_manager.py``, ``health_servicer.py``, ``utils.py``;
sgl-project/sglang, ``python/sglang/srt/managers/scheduler.py``):

* Generate with ``stream`` set sends one ``GenerateStreamChunk`` per scheduler
  output with the *new* token ids (and cumulative counts); when the request
  finishes, the last chunk is followed by a ``GenerateComplete`` whose
  ``output_ids`` repeat *that last chunk's* ids (not all of them), with the
  finish reason ``stop``, ``length`` or ``abort`` and ``matched_token_id`` when a
  stop token ended it. The scheduler's ids reach the servicer untrimmed, so the
  stop token itself comes as the answer's last token (SMG's gateway trims it);
  this client drops it.
* Sampling fields are taken as sent, and proto3's zero defaults are not SGLang's
  (``top_p`` 0 and ``top_k`` 0 are invalid; -1 disables top-k): we always send
  every field. The protocol has no seed: seeded requests sample unseeded there.
* Abort takes one request id; a cancelled RPC aborts the request too.
* GetLoads reports every data-parallel rank: running and waiting requests,
  ``token_usage`` (KV-cache use, 0..1), ``gen_throughput`` (tokens/s),
  ``max_running_requests`` and ``num_waiting_uncached_tokens`` (queued prompt
  tokens the prefix cache does not hold).
* The ``HealthCheck`` RPC runs a one-token request and polls for it once a
  second, so it takes a second or more; the standard ``grpc.health.v1`` service
  the server also runs answers at once (NOT_SERVING while shutting down), so
  health checks use that, and HealthCheck only on servers without it.
* Errors: a refused request is INVALID_ARGUMENT; engine failures are INTERNAL. A
  full queue (``--max-queued-requests``) is HTTP 503 in the scheduler
  (``_abort_on_queued_limit``: "The request queue is full.", or with priority
  scheduling "The request is aborted by a higher priority request." for a waiting
  one it pushed out), which the servicer sends as UNAVAILABLE with that message
  (``abort_code_from_output``). UNAVAILABLE is also what an unreachable server
  gives, so this client tells them apart by the message: a full queue is
  RESOURCE_EXHAUSTED here (a busy worker, not a failing one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from tokenwire.backend import FinishReason, GenerateRequest, LoadReport
from tokenwire.router.client import Ending, EngineClient, ModelInfo, load_of_ranks

__all__ = ["SCHEDULER_SERVICE_NAME", "SglangClient", "request_message"]

SCHEDULER_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SglangScheduler"].full_name
# The scheduler's messages for requests it refuses because its waiting queue is full.
_QUEUE_FULL = ("request queue is full", "aborted by a higher priority request")
_REASON = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
}


def request_message(request: GenerateRequest) -> pb.GenerateRequest:
    """SglangScheduler's GenerateRequest for an engine request (token ids, streamed)."""
    sampling = request.sampling
    params = pb.SamplingParams(
        temperature=sampling.temperature,  # 0: greedy
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        min_p=0.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        repetition_penalty=1.0,
        max_new_tokens=request.max_tokens,
        stop_token_ids=sorted(request.stop_token_ids),
        skip_special_tokens=False,
        spaces_between_special_tokens=True,
        n=1,
    )
    return pb.GenerateRequest(
        request_id=request.request_id,
        tokenized=pb.TokenizedInput(input_ids=request.prompt_token_ids),
        sampling_params=params,
        logprob_start_len=-1,
        stream=True,
    )


class SglangClient(EngineClient):
    """A worker speaking SglangScheduler, as an engine."""

    protocol = "sglang"
    _standard_health = True  # False once the server turned out to have no grpc.health.v1

    def _new_stub(self, channel: grpc.aio.Channel) -> Any:
        self._health_stub = health_pb2_grpc.HealthStub(channel)
        return pb_grpc.SglangSchedulerStub(channel)

    async def _model_info(self) -> ModelInfo:
        info = await self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return ModelInfo(
            model=str(info.served_model_name or info.model_path),
            context_length=int(info.max_context_length),
        )

    async def _health(self) -> bool:
        stub = self.stub
        if self._standard_health:
            try:
                reply = await self._health_stub.Check(
                    health_pb2.HealthCheckRequest(service=SCHEDULER_SERVICE_NAME),
                    metadata=self._metadata,
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._standard_health = False
            else:
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        answer = await stub.HealthCheck(
            pb.HealthCheckRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return bool(answer.healthy)

    async def _loads(self) -> tuple[LoadReport, int]:
        reply = await self.stub.GetLoads(
            pb.GetLoadsRequest(include=["core"]), metadata=self._metadata, timeout=self._timeout
        )
        return load_of_ranks(reply.loads)

    def _message(self, request: GenerateRequest) -> Any:
        return request_message(request)

    def _read(self, response: Any) -> tuple[Sequence[int], Ending | None]:
        if response.HasField("chunk"):
            return response.chunk.token_ids, None
        end = response.complete
        # Streamed: output_ids repeat the last chunk's ids, which were read already.
        return (), Ending(
            _REASON.get(end.finish_reason, FinishReason.ERROR),
            int(end.prompt_tokens),
            int(end.completion_tokens),
        )

    def _at_capacity(self, exc: grpc.aio.AioRpcError) -> bool:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        details = (exc.details() or "").lower()
        return any(message in details for message in _QUEUE_FULL)

    async def _send_abort(self, request_id: str) -> None:
        await self.stub.Abort(
            pb.AbortRequest(request_id=request_id),
            metadata=self._metadata,
            timeout=self._timeout,
        )
