"""The engine protocol between gateway and workers: ``vllm.grpc.engine.VllmEngine``.

Tokenwire's workers serve the service that vLLM's own gRPC server serves (its
protos ship in the PyPI package ``smg-grpc-proto``), and the gateway's engine
client speaks it, so one client reaches Tokenwire workers and vLLM alike. This
module holds what both sides share: the conversions between the plain types of
:mod:`tokenwire.backend` and the protocol's messages, and the metadata keys.

What the protocol has no field for travels as call metadata, which other servers
ignore: the prefix-cache scope of a request and how many of its prompt tokens
every conversation shares (see :class:`tokenwire.backend.GenerateRequest`), and
the least time between two messages of an answer that the caller wants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from smg_grpc_proto import vllm_engine_pb2 as pb

from tokenwire.backend import Chunk, FinishReason, GenerateRequest, LoadReport, SamplingParams
from tokenwire.errors import InvalidArgumentError

__all__ = [
    "CACHE_SCOPE_KEY",
    "MESSAGE_INTERVAL_KEY",
    "SHARED_PREFIX_KEY",
    "complete_message",
    "finish_reason_of",
    "message_interval_of",
    "request_message",
    "request_of",
    "scheduler_load",
]

CACHE_SCOPE_KEY = "tokenwire-cache-scope"
SHARED_PREFIX_KEY = "tokenwire-shared-prefix"
# Least milliseconds between two messages of one answer, asked by the caller (a
# gateway): tokens made meanwhile ride in the next message.
MESSAGE_INTERVAL_KEY = "tokenwire-message-interval-ms"
MAX_MESSAGE_INTERVAL_MS = 1000.0

_WIRE_REASON = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "abort",
    FinishReason.CONTENT_FILTER: "stop",
    FinishReason.ERROR: "error",
}
_REASON = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
}


def finish_reason_of(wire: str) -> FinishReason:
    """The finish reason a ``GenerateComplete.finish_reason`` string names."""
    return _REASON.get(wire, FinishReason.ERROR)


def request_message(request: GenerateRequest) -> pb.GenerateRequest:
    """The protocol's GenerateRequest for an engine request (token ids, streamed)."""
    sampling = request.sampling
    params = pb.SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=max(0, sampling.top_k),
        max_tokens=request.max_tokens,
        stop_token_ids=sorted(request.stop_token_ids),
        skip_special_tokens=False,
    )
    if sampling.seed is not None:
        # The protocol's seed is an int32: larger seeds fold into it, still fixed.
        params.seed = _int32(sampling.seed)
    return pb.GenerateRequest(
        request_id=request.request_id,
        tokenized=pb.TokenizedInput(input_ids=request.prompt_token_ids),
        sampling_params=params,
        stream=True,
    )


def request_of(
    message: pb.GenerateRequest,
    *,
    context_length: int,
    eos_token_ids: frozenset[int],
    metadata: Sequence[tuple[str, str | bytes]] = (),
) -> GenerateRequest:
    """The engine request a protocol GenerateRequest asks for; InvalidArgumentError
    names what this worker cannot serve (text input, several samples, constraints)."""
    if message.WhichOneof("input") != "tokenized" or not message.tokenized.input_ids:
        raise InvalidArgumentError("this worker takes token ids: set tokenized.input_ids")
    if not message.request_id:
        raise InvalidArgumentError("request_id is required")
    params = message.sampling_params
    if params.n > 1:
        raise InvalidArgumentError("this worker generates one sample per request (n <= 1)")
    if params.WhichOneof("constraint") is not None:
        raise InvalidArgumentError("this worker has no constrained decoding")
    prompt = tuple(message.tokenized.input_ids)
    room = context_length - len(prompt)
    if room < 1:
        raise InvalidArgumentError(
            f"the prompt's {len(prompt)} tokens leave no room in the {context_length}-token context"
        )
    max_tokens = min(params.max_tokens, room) if params.HasField("max_tokens") else room
    if max_tokens < 1:
        raise InvalidArgumentError("max_tokens must be at least 1")
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if not (temperature >= 0 and 0 <= params.top_p <= 1):
        raise InvalidArgumentError("temperature must be >= 0 and top_p within 0..1")
    stops = frozenset(params.stop_token_ids)
    if not params.ignore_eos:
        stops |= eos_token_ids  # the engine stops at EOS itself: no step wasted after it
    fields = dict(metadata)
    scope = fields.get(CACHE_SCOPE_KEY, "")
    shared = fields.get(SHARED_PREFIX_KEY, "0")
    try:
        shared_tokens = max(0, int(shared))
    except ValueError:
        raise InvalidArgumentError(f"{SHARED_PREFIX_KEY} must be an integer") from None
    return GenerateRequest(
        request_id=message.request_id,
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        sampling=SamplingParams(
            temperature=temperature,
            top_p=params.top_p or 1.0,
            top_k=params.top_k,
            seed=params.seed if params.HasField("seed") else None,
        ),
        stop_token_ids=stops,
        cache_scope=scope if isinstance(scope, str) else scope.decode(),
        shared_prefix_tokens=shared_tokens,
    )


def message_interval_of(metadata: Sequence[tuple[str, str | bytes]], default_s: float) -> float:
    """The seconds between two messages a call asks for in its metadata, else
    ``default_s``; InvalidArgumentError outside 0..1000 ms."""
    for key, value in metadata:
        if key == MESSAGE_INTERVAL_KEY:
            text = value if isinstance(value, str) else value.decode()
            try:
                interval_ms = float(text)
            except ValueError:
                interval_ms = -1.0
            if not 0 <= interval_ms <= MAX_MESSAGE_INTERVAL_MS:
                raise InvalidArgumentError(
                    f"{MESSAGE_INTERVAL_KEY} must be a number of milliseconds within "
                    f"0..{MAX_MESSAGE_INTERVAL_MS:g}, got {text!r}"
                )
            return interval_ms / 1000
    return default_s


def complete_message(chunk: Chunk, output_ids: Sequence[int]) -> pb.GenerateResponse:
    """The protocol's final response for an engine's last chunk."""
    return pb.GenerateResponse(
        complete=pb.GenerateComplete(
            output_ids=output_ids,
            finish_reason=_WIRE_REASON[chunk.finish_reason or FinishReason.ERROR],
            prompt_tokens=chunk.prompt_tokens,
            completion_tokens=chunk.completion_tokens,
        )
    )


def scheduler_load(report: LoadReport, max_running: int, message: Any = None) -> Any:
    """An engine's load report as the protocol's SchedulerLoad (or ``message``, the same
    message of another protocol: SGLang's has the same fields)."""
    return (message or pb.SchedulerLoad)(
        num_running_reqs=report.running,
        num_waiting_reqs=report.queued,
        num_total_reqs=report.running + report.queued,
        token_usage=report.kv_cache_usage,
        gen_throughput=report.tokens_per_second,
        utilization=min(1.0, report.running / max(1, max_running)),
        max_running_requests=max_running,
        num_waiting_uncached_tokens=report.queued_tokens,
    )


def _int32(seed: int) -> int:
    folded = seed & 0xFFFFFFFF
    return folded - (1 << 32) if folded >= 1 << 31 else folded
