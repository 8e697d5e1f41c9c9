"""A stand-in for ``trtllm-serve --grpc``: TensorRT-LLM's ``trtllm.TrtllmService`` over any engine.

Not TensorRT-LLM: a test double generated from the engine's own proto (the
``smg-grpc-proto`` stubs) that answers as the real servicer does
(NVIDIA/TensorRT-LLM, ``tensorrt_llm/grpc/smg/servicer.py`` and
``request_manager.py``), so the gateway's client can be tested without a GPU:

* Generate takes token ids only (no ``tokenized``: INVALID_ARGUMENT); with
  ``streaming`` it sends each step's *new* ids as a ``GenerateStreamChunk``
  (counts cumulative), then a ``GenerateComplete`` with *all* output ids, the
  counts and ``stop`` / ``length`` / ``cancelled``, and ``matched_token_id`` when
  a stop token ended it. Stop tokens (``stop_token_ids``, and the model's EOS
  unless ``ignore_eos``) are stripped unless ``include_stop_token_in_output``.
* Abort (one request id) ends that request's stream with ``cancelled``; a
  cancelled call stops the engine's work too.
* Errors as the servicer maps them: a bad request INVALID_ARGUMENT, anything the
  engine raises INTERNAL (TensorRT-LLM queues what it cannot run yet, so it has
  no capacity status of its own).
* HealthCheck's ``status`` is ``"OK"``, or what ``unhealthy`` says; tests read
  ``health_checks`` to count them.
* No load call (the protocol has none); GetModelInfo leaves ``max_batch_size``
  at 0 as the servicer does. GetTokenizer is served unless
  ``serve_tokenizer=False`` (releases without it answer UNIMPLEMENTED).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from smg_grpc_proto import trtllm_service_pb2 as pb
from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from tokenwire.backend import Engine, FinishReason, GenerateRequest, SamplingParams
from tokenwire.errors import InvalidArgumentError
from tokenwire.testing.standins.common import EngineRunner

__all__ = ["TrtllmStandin"]

Context = grpc.aio.ServicerContext[Any, Any]
_WIRE_REASON = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "cancelled",
}


class TrtllmStandin(pb_grpc.TrtllmServiceServicer):  # type: ignore[misc]
    """TrtllmService over ``engine``, as ``trtllm-serve --grpc`` answers (a stand-in)."""

    def __init__(
        self,
        engine: Engine,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
        serve_tokenizer: bool = True,
    ) -> None:
        self.runner = EngineRunner(engine)
        self._eos = eos_token_ids
        self._serve_tokenizer = serve_tokenizer
        self.unhealthy = ""  # set: HealthCheck reports it (the executor's fatal error)
        self.health_checks = 0  # HealthCheck calls received
        self.requests: list[pb.GenerateRequest] = []  # every Generate, as received
        self.abort_calls: list[str] = []  # every Abort's request id, as received

    def _job(self, request: pb.GenerateRequest) -> tuple[GenerateRequest, frozenset[int]]:
        prompt = tuple(request.tokenized.input_token_ids)
        caps = self.runner.engine.capabilities
        if not prompt:
            raise InvalidArgumentError("the prompt has no tokens")
        if request.max_tokens < 1:
            raise InvalidArgumentError("max_tokens is required")
        if len(prompt) + request.max_tokens > caps.context_length:
            raise InvalidArgumentError(
                f"the prompt's {len(prompt)} tokens plus max_tokens {request.max_tokens} "
                f"exceed max_seq_len {caps.context_length}"
            )
        config = request.sampling_config
        if config.beam_width > 1 or config.num_return_sequences > 1:
            raise InvalidArgumentError("the stand-in generates one sequence")
        sampling = SamplingParams(
            temperature=config.temperature if config.HasField("temperature") else 1.0,
            top_p=config.top_p if config.HasField("top_p") else 1.0,
            top_k=config.top_k if config.HasField("top_k") else 0,
            seed=config.seed if config.HasField("seed") else None,
        )
        stops = frozenset(request.stop_token_ids)
        if not request.ignore_eos:
            stops |= self._eos
        job = GenerateRequest(request.request_id, prompt, request.max_tokens, sampling)
        return job, stops

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.requests.append(request)
        request_id = request.request_id
        if not request.HasField("tokenized"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Missing tokenized input")
        try:
            job, stops = self._job(request)
            prompt_tokens = len(job.prompt_token_ids)
            steps = self.runner.steps(
                job, stops=stops, keep_stop=request.include_stop_token_in_output
            )
            output: list[int] = []
            async with contextlib.aclosing(steps):
                async for step in steps:
                    output.extend(step.token_ids)
                    if request.streaming and step.token_ids:
                        yield pb.GenerateResponse(
                            request_id=request_id,
                            chunk=pb.GenerateStreamChunk(
                                token_ids=step.token_ids,
                                prompt_tokens=prompt_tokens,
                                completion_tokens=len(output),
                            ),
                        )
                    if step.finish is not None:
                        complete = pb.GenerateComplete(
                            output_token_ids=output,
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
        except Exception as exc:  # the servicer sends the engine's error text as INTERNAL
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))

    async def Abort(self, request: pb.AbortRequest, context: Context) -> pb.AbortResponse:
        self.abort_calls.append(request.request_id)
        success = self.runner.abort(request.request_id)
        state = "aborted" if success else "not found"
        return pb.AbortResponse(success=success, message=f"Request {request.request_id} {state}")

    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: Context
    ) -> pb.HealthCheckResponse:
        self.health_checks += 1
        return pb.HealthCheckResponse(status=self.unhealthy or "OK")

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        caps = self.runner.engine.capabilities
        return pb.GetModelInfoResponse(
            model_id=caps.model,
            max_input_len=caps.context_length,
            max_seq_len=caps.context_length,
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Context
    ) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(
            version="stand-in",
            backend="tensorrt-llm",
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
            context_parallel_size=1,
            world_size=1,
        )

    async def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: Context
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        if not self._serve_tokenizer:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        for data, digest in await self.runner.tokenizer_chunks():
            yield common_pb2.GetTokenizerChunk(data=data, sha256=digest)
