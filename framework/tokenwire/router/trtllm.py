"""The engine client for TensorRT-LLM's ``trtllm.TrtllmService`` (``trtllm-serve --grpc``).

What the real server does, and this client relies on (NVIDIA/TensorRT-LLM,
``tensorrt_llm/grpc/smg/servicer.py`` and ``request_manager.py``; the proto's
comments in ``smg_grpc_proto/proto/trtllm_service.proto``):

* Generate streams ``GenerateStreamChunk``\\ s with only the *new* token ids (the
  servicer computes the deltas from TensorRT-LLM's cumulative ids), then one
  ``GenerateComplete`` per sequence with *all* output ids, the counts and a
  finish reason from TensorRT-LLM's ``CompletionOutput``: ``stop``, ``length``,
  ``timeout`` or ``cancelled`` (the proto also names ``stop_word``). Stop
  tokens are stripped unless ``include_stop_token_in_output``; we ask for
  output without the prompt (``exclude_input_from_output``), as SMG does.
* Abort takes one request id and aborts TensorRT-LLM's ``GenerationResult``;
  a cancelled RPC aborts it too.
* HealthCheck answers a free-form ``status``: ``"OK"`` is the only healthy value
  (read as SMG does, case-insensitive: lightseekorg/smg,
  ``model_gateway/src/routers/grpc/client.rs``).
* There is no load call: SMG treats GetLoads as UNIMPLEMENTED for this
  protocol too, so the router counts its own requests to such a worker, and
  ``router.default_max_running`` says how many it runs at once. GetModelInfo's
  ``max_batch_size`` counts when a server fills it (the servicer above does not).
* GetModelInfo's ``model_id`` is the served model name (or the model path);
  the context is ``max_seq_len``, else ``max_input_len``. Releases without
  GetTokenizer need ``router.tokenizer``.
* Errors: a bad request is INVALID_ARGUMENT, an engine failure INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from smg_grpc_proto import trtllm_service_pb2 as pb
from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

from tokenwire.backend import FinishReason, GenerateRequest, LoadReport
from tokenwire.router.client import Ending, EngineClient, ModelInfo

__all__ = ["TrtllmClient", "request_message"]

_REASON = {
    "stop": FinishReason.STOP,
    "stop_word": FinishReason.STOP,
    "": FinishReason.STOP,  # a finished sequence that names no reason (older servicers: "stop")
    "length": FinishReason.LENGTH,
    "cancelled": FinishReason.CANCELLED,
}
_UINT64 = (1 << 64) - 1


def request_message(request: GenerateRequest) -> pb.GenerateRequest:
    """TrtllmService's GenerateRequest for an engine request (token ids, streamed)."""
    sampling = request.sampling
    config = pb.SamplingConfig(
        beam_width=1,
        num_return_sequences=1,
        temperature=sampling.temperature,  # 0: greedy
        top_p=sampling.top_p,
        repetition_penalty=1.0,
    )
    if sampling.top_k > 0:
        config.top_k = sampling.top_k
    if sampling.seed is not None:
        config.seed = sampling.seed & _UINT64  # a uint64: negative seeds fold, still fixed
    return pb.GenerateRequest(
        request_id=request.request_id,
        tokenized=pb.TokenizedInput(input_token_ids=request.prompt_token_ids),
        sampling_config=config,
        output_config=pb.OutputConfig(exclude_input_from_output=True),
        max_tokens=request.max_tokens,
        streaming=True,
        stop_token_ids=sorted(request.stop_token_ids),
    )


class TrtllmClient(EngineClient):
    """A worker speaking TrtllmService, as an engine."""

    protocol = "trtllm"
    has_load_call = False

    def _new_stub(self, channel: grpc.aio.Channel) -> Any:
        return pb_grpc.TrtllmServiceStub(channel)

    async def _model_info(self) -> ModelInfo:
        info = await self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return ModelInfo(
            model=str(info.model_id),
            context_length=int(info.max_seq_len or info.max_input_len),
            max_running=max(0, int(info.max_batch_size)),
        )

    async def _health(self) -> bool:
        reply = await self.stub.HealthCheck(
            pb.HealthCheckRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return str(reply.status).strip().lower() == "ok"

    async def _loads(self) -> tuple[LoadReport, int]:
        raise NotImplementedError("TrtllmService has no load call")

    def _message(self, request: GenerateRequest) -> Any:
        return request_message(request)

    def _read(self, response: Any) -> tuple[Sequence[int], Ending | None]:
        if response.HasField("chunk"):
            return response.chunk.token_ids, None
        end = response.complete
        return (), Ending(
            _REASON.get(end.finish_reason, FinishReason.ERROR),  # "timeout" and unknowns
            int(end.prompt_tokens),
            int(end.completion_tokens),
            end.output_token_ids,
        )

    async def _send_abort(self, request_id: str) -> None:
        await self.stub.Abort(
            pb.AbortRequest(request_id=request_id),
            metadata=self._metadata,
            timeout=self._timeout,
        )
