"""A Triton server's TensorRT-LLM model as a Tokenwire text backend.

Each request is one ``ModelStreamInfer`` stream in decoupled mode, on the stubs
that ship in ``tritonclient`` (``tritonclient.grpc.aio`` reads readiness and
statistics): the conversation goes in as ``text_input`` (see
:class:`~tokenwire_triton.options.TritonOptions` for how messages become a prompt),
with ``max_tokens``, ``stream``, the sampling inputs, ``stop_words`` and, when
configured, ``end_id`` / ``pad_id``; ``text_output`` comes back as deltas (the
``ensemble``) or cumulative (``tensorrt_llm_bls`` with ``accumulate_tokens``).
The request asks for an empty final response, so the end of the answer is known
without guessing. Closing the answer cancels the stream; Triton then cancels the
request in its backend.

The finish reason is the server's ``finish_reason`` output where it has one (a
Tokenwire gateway's inference frontend), else ``length`` when the answer took
``max_tokens`` tokens and ``stop`` otherwise. Token counts come from
``num_output_tokens`` / ``num_input_tokens`` when the model returns them, else
one token per non-empty response.

Load: the requests this gateway has running are counted exactly; how many wait
in Triton is estimated from its statistics (``ModelStatistics``, read every
``stats_interval_s``): requests finished per second times their average queue
time (Little's law).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from tokenwire.backend import (
    Capabilities,
    ChatMessage,
    FinishReason,
    LoadReport,
    TextChunk,
    TextRequest,
)
from tokenwire.errors import (
    ConfigError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TokenwireError,
    UnavailableError,
)
from tokenwire.logs import get_logger
from tokenwire.services.inference_tensors import bytes_tensor, scalar_tensor
from tokenwire_triton.options import TritonOptions

__all__ = ["TritonBackend"]

_log = get_logger("tokenwire.triton")
_RATE_WINDOW_S = 5.0


class TritonBackend:
    """Text in, text out, through a Triton server (``tritonclient.grpc.aio``)."""

    def __init__(self, options: TritonOptions, *, model_name: str = "") -> None:
        self.options = options
        self._name = model_name or options.model
        self._client: Any = None  # tritonclient.grpc.aio: readiness, statistics
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None  # tritonclient's GRPCInferenceServiceStub: the answers
        self._pb: Any = None  # tritonclient.grpc.service_pb2
        self._result: Any = None  # tritonclient.grpc.InferResult
        self._render: Any = None
        self._running = 0
        self._queued_estimate = 0
        self._produced: deque[tuple[float, int]] = deque()
        self._stats_task: asyncio.Task[None] | None = None
        self._last_stats: tuple[float, int, int] | None = None  # (time, success, queue ns)
        self._ids = itertools.count()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            model=self._name,
            context_length=self.options.context_length,
            max_batch=self.options.max_batch,
        )

    async def start(self) -> None:
        try:
            import tritonclient.grpc.aio as aioclient
            from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
        except ImportError as exc:
            raise ConfigError(
                f"the triton backend needs tritonclient ({exc}); "
                "install its extra: pip install 'tokenwire[triton]'"
            ) from exc
        self._pb, self._result = service_pb2, InferResult
        self._render = await asyncio.to_thread(self._renderer)  # a tokenizer loads from disk
        o = self.options
        ca = await asyncio.to_thread(_read, o.tls_ca_file) if o.tls_ca_file else None
        self._client = aioclient.InferenceServerClient(
            o.url, ssl=ca is not None, root_certificates=o.tls_ca_file or None
        )
        # The answers use tritonclient's own stub on a channel of ours: its asyncio
        # stream_infer cannot ask for the empty final response (a reserved parameter).
        self._channel = (
            grpc.aio.secure_channel(o.url, grpc.ssl_channel_credentials(ca))
            if ca is not None
            else grpc.aio.insecure_channel(o.url)
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        try:
            ready = await self._client.is_model_ready(
                self.options.model,
                headers=self._headers(),
                client_timeout=self.options.timeout_s,
            )
        except Exception as exc:
            await self.close()
            raise ConfigError(
                f"the Triton server at {self.options.url} could not say whether model "
                f"{self.options.model!r} is ready ({exc}); check backend.options url and token"
            ) from exc
        if not ready:
            await self.close()
            raise ConfigError(
                f"model {self.options.model!r} is not ready on the Triton server at "
                f"{self.options.url} (backend.options model=...)"
            )
        self._stats_task = asyncio.ensure_future(self._poll_stats())

    async def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
            self._stats_task = None
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close(None)

    def load(self) -> LoadReport:
        now = time.monotonic()
        while self._produced and self._produced[0][0] < now - _RATE_WINDOW_S:
            self._produced.popleft()
        tokens = sum(n for _, n in self._produced)
        return LoadReport(
            running=self._running,
            queued=self._queued_estimate,
            tokens_per_second=tokens / _RATE_WINDOW_S,
        )

    def _headers(self) -> dict[str, str] | None:
        return {"authorization": f"Bearer {self.options.token}"} if self.options.token else None

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.options.token}"),) if self.options.token else ()

    # -- the prompt -----------------------------------------------------------

    def _renderer(self) -> Any:
        kind = self.options.prompt
        if kind == "last_message":
            return _last_message
        if kind == "plain":
            return _plain
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ConfigError(
                "prompt=chat_template needs transformers: pip install 'tokenwire[torch]'"
            ) from exc
        tokenizer = AutoTokenizer.from_pretrained(self.options.tokenizer)

        def render(messages: Sequence[ChatMessage]) -> str:
            turns = [{"role": m.role, "content": m.content} for m in messages]
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            return str(text)

        return render

    # -- one answer -----------------------------------------------------------

    def _request(self, request: TextRequest) -> Any:
        o, sampling = self.options, request.sampling
        tensors = [
            ("text_input", bytes_tensor([self._render(request.messages)])),
            ("max_tokens", scalar_tensor("INT32", request.max_tokens)),
            ("stream", scalar_tensor("BOOL", True)),
            ("temperature", scalar_tensor("FP32", sampling.temperature)),
            ("top_p", scalar_tensor("FP32", sampling.top_p)),
        ]
        if sampling.top_k > 0:
            tensors.append(("top_k", scalar_tensor("INT32", sampling.top_k)))
        if sampling.seed is not None:
            tensors.append(("seed", scalar_tensor("UINT64", sampling.seed % (1 << 64))))
        if request.stop:
            tensors.append(("stop_words", bytes_tensor(list(request.stop))))
        if o.end_id is not None:
            tensors.append(("end_id", scalar_tensor("INT32", o.end_id)))
        if o.pad_id is not None:
            tensors.append(("pad_id", scalar_tensor("INT32", o.pad_id)))
        message = self._pb.ModelInferRequest(
            model_name=o.model, id=f"{request.request_id}-{next(self._ids)}"
        )
        for name, (datatype, shape, raw) in tensors:
            message.inputs.add(name=o.name(name), datatype=datatype, shape=shape)
            message.raw_input_contents.append(raw)
        # The end of a decoupled answer is an empty response flagged final: without it a
        # model that ends with a flags-only response never says it is done.
        message.parameters["triton_enable_empty_final_response"].bool_param = True
        return message

    async def generate_text(self, request: TextRequest) -> AsyncIterator[TextChunk]:
        if self._stub is None:
            raise UnavailableError("the Triton backend is not started")
        call = self._stub.ModelStreamInfer(iter([self._request(request)]), metadata=self._metadata)
        self._running += 1
        text_name = self.options.name("text_output")
        cumulative = self.options.output == "cumulative"
        so_far = ""  # the cumulative text (BLS) seen so far
        completion = prompt_tokens = 0
        reason: FinishReason | None = None
        done = False
        try:
            async for message in call:
                if message.error_message:
                    raise _error_of(message.error_message, self.options.url)
                result = self._result(message.infer_response)
                text = _first_text(result, text_name)
                if cumulative and text is not None:
                    # The whole text so far; a server that rewrote its start (a
                    # detokenizer settling a character) gets what it says now, whole.
                    new = text[len(so_far) :] if text.startswith(so_far) else text
                    text, so_far = new, text
                tokens = _first_int(result, "num_output_tokens")
                if text:
                    count = tokens if tokens is not None else 1
                    completion += count
                    self._produced.append((time.monotonic(), count))
                    yield TextChunk(text, count)
                prompt_tokens = _first_int(result, "num_input_tokens") or prompt_tokens
                wire_reason = _first_text(result, "finish_reason")
                if wire_reason:
                    reason = _REASONS.get(wire_reason, FinishReason.STOP)
                final = message.infer_response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    done = True
                    break
            if not done:
                raise UnavailableError(
                    f"the Triton server at {self.options.url} ended the stream before the answer"
                )
            if reason is None:
                reason = (
                    FinishReason.LENGTH if completion >= request.max_tokens else FinishReason.STOP
                )
            yield TextChunk("", 0, reason, prompt_tokens, completion)
        except grpc.aio.AioRpcError as exc:
            raise _call_error(exc, self.options.url) from None
        finally:
            self._running -= 1
            if not done:  # the consumer left or the stream failed: stop Triton's work
                call.cancel()

    # -- load -----------------------------------------------------------------

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(self.options.stats_interval_s)
            try:
                stats = await self._client.get_inference_statistics(
                    self.options.model,
                    headers=self._headers(),
                    client_timeout=self.options.timeout_s,
                )
            except Exception as exc:  # load reports are best effort; turns still go
                _log.debug("reading Triton's statistics failed", error=str(exc))
                continue
            self._update_queue(stats)

    def _update_queue(self, stats: Any) -> None:
        entries = list(stats.model_stats)
        if not entries:
            return
        success = sum(e.inference_stats.success.count for e in entries)
        queue_ns = sum(e.inference_stats.queue.ns for e in entries)
        now = time.monotonic()
        last, self._last_stats = self._last_stats, (now, success, queue_ns)
        if last is None or now <= last[0]:
            return
        finished = success - last[1]
        if finished <= 0:
            # Nothing finished: an idle server, or one busy with long answers, whose
            # queue is then at least what it was.
            if not self._running:
                self._queued_estimate = 0
            return
        rate = finished / (now - last[0])
        wait_s = (queue_ns - last[2]) / finished / 1e9
        # Triton's queue holds this gateway's waiting requests too, which load() already
        # counts as running: only the rest is queued.
        self._queued_estimate = max(0, round(rate * wait_s) - self._running)


_NP = {"BYTES": object, "INT32": "int32", "BOOL": bool, "FP32": "float32", "UINT64": "uint64"}
_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "cancelled": FinishReason.CANCELLED,
    "content_filter": FinishReason.CONTENT_FILTER,
    "error": FinishReason.ERROR,
}


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"backend.options tls_ca_file: cannot read {path!r} ({exc})") from exc


def _last_message(messages: Sequence[ChatMessage]) -> str:
    """The user's newest message (for a server that templates and keeps history itself)."""
    return messages[-1].content if messages else ""


def _plain(messages: Sequence[ChatMessage]) -> str:
    """``role: content`` lines, then ``assistant:`` for the answer to follow."""
    lines = [f"{m.role}: {m.content}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def _first_text(result: Any, name: str) -> str | None:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    # A model may cut a character between two responses: never fail the answer for it.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _first_int(result: Any, name: str) -> int | None:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    return int(array.reshape(-1)[0])


_INPUT_ERRORS = ("unexpected inference input", "invalid argument", "exceeds", "must be")
# Status code names a Tokenwire frontend puts before an in-stream error that say more
# than "retry": the others are read as a failure of the request.
_IN_STREAM_CODES = frozenset(
    {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND"}
)
_GATEWAY_REFUSED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "UNIMPLEMENTED"})


def _error_of(message: str, url: str) -> TokenwireError:
    """An in-stream error of Triton (or of a Tokenwire inference frontend) as ours.

    A Tokenwire frontend prefixes its status code's name; Triton's own messages
    carry none, so the words of its input checks mark a refused request."""
    code = message.partition(":")[0].strip().upper()
    if code != "RESOURCE_EXHAUSTED" and any(w in message.lower() for w in _INPUT_ERRORS):
        code = "INVALID_ARGUMENT"
    return _error_for(code if code in _IN_STREAM_CODES else "", message, url)


def _call_error(exc: grpc.aio.AioRpcError, url: str) -> TokenwireError:
    """The stream's status as ours: its code, not its words, says what it was."""
    return _error_for(exc.code().name, exc.details() or "", url)


def _error_for(code: str, detail: str, url: str) -> TokenwireError:
    """The error for a status code name (empty: none known) and the server's words."""
    if code == "RESOURCE_EXHAUSTED":
        return ResourceExhaustedError(
            "the Triton server is at capacity; retry shortly", retry_after_s=1.0
        )
    if code in ("INVALID_ARGUMENT", "OUT_OF_RANGE"):
        return InvalidArgumentError(f"the Triton server refused the request: {detail}")
    if code in _GATEWAY_REFUSED:
        return FailedPreconditionError(
            f"the Triton server at {url} refused this gateway ({code}): check backend.options"
        )
    failed = f"failed ({code})" if code else "failed the request"
    return UnavailableError(f"the Triton server at {url} {failed}; retry")
