"""The engine client for vLLM's ``vllm.grpc.engine.VllmEngine``: our own workers and vLLM's.

``tokenwire worker`` serves this protocol (see :mod:`tokenwire.worker.service`),
and so does vLLM's gRPC server. Chunks carry the new token ids; the final
``GenerateComplete`` carries the finish reason, the counts and every output id
(cumulative). Abort takes a list of request ids; GetLoads reports each
data-parallel rank's load.

    engine = VllmClient("10.0.0.5:50061", token="s3cret")
    await engine.start()          # model info, and the tokenizer the worker sends
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

from tokenwire.backend import GenerateRequest, LoadReport
from tokenwire.router.client import Ending, EngineClient, ModelInfo, load_of_ranks
from tokenwire.worker.protocol import finish_reason_of, request_message

__all__ = ["VllmClient"]


class VllmClient(EngineClient):
    """A worker speaking VllmEngine, as an engine."""

    protocol = "vllm"

    def _new_stub(self, channel: grpc.aio.Channel) -> Any:
        return pb_grpc.VllmEngineStub(channel)

    async def _model_info(self) -> ModelInfo:
        info = await self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return ModelInfo(
            model=str(info.served_model_name or info.model_path),
            context_length=int(info.max_context_length),
        )

    async def _health(self) -> bool:
        reply = await self.stub.HealthCheck(
            pb.HealthCheckRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return bool(reply.healthy)

    async def _loads(self) -> tuple[LoadReport, int]:
        reply = await self.stub.GetLoads(
            pb.GetLoadsRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return load_of_ranks(reply.loads)

    def _message(self, request: GenerateRequest) -> Any:
        return request_message(request)

    def _read(self, response: Any) -> tuple[Sequence[int], Ending | None]:
        if response.HasField("chunk"):
            return response.chunk.token_ids, None
        end = response.complete
        return (), Ending(
            finish_reason_of(end.finish_reason),
            int(end.prompt_tokens),
            int(end.completion_tokens),
            end.output_ids,
        )

    async def _send_abort(self, request_id: str) -> None:
        await self.stub.Abort(
            pb.AbortRequest(request_ids=[request_id]),
            metadata=self._metadata,
            timeout=self._timeout,
        )
