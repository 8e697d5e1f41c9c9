"""``inference.GRPCInferenceService``: the Open Inference Protocol (KServe v2) over Tokenwire.

Triton's clients and tools (``tritonclient.grpc``, its asyncio client, perf
tools) talk to the gateway as to a Triton server hosting TensorRT-LLM's
``ensemble`` model, with the same tensor names (:mod:`tokenwire.services.inference_tensors`).
Each inference request is one chat turn through the same turn runner as
``ChatService``: the call passes the interceptors (authentication, request and
stream quotas) and the turn the per-turn policies (credentials, token quotas,
moderation of the message and of the answer), and the turn is stored as a
conversation. ``ModelStreamInfer`` is decoupled: requests on one stream run
concurrently (up to ``server.inference_stream_requests``), each answered by its
deltas when it asks to ``stream``, and a failed request is reported in the
stream (``error_message``, prefixed with its status code name) while the stream
stays open. Each response carries the parameter ``triton_final_response``; with
``triton_enable_empty_final_response`` the last one is an empty response.
Cancelling the stream cancels its running turns, which keep what was sent.

The stubs are the ones that ship in ``tritonclient`` (extra ``triton``). Model
repository, shared-memory, trace and log calls are UNIMPLEMENTED.

    config.server.open_inference = True     # served beside ChatService on the same port
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tokenwire import __version__
from tokenwire.context import current_call
from tokenwire.errors import (
    Code,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    status_of,
)
from tokenwire.interceptors.base import UndecodableRequest
from tokenwire.logs import get_logger
from tokenwire.model.frontend import ChatModel
from tokenwire.services.inference_tensors import (
    INPUTS,
    OUTPUTS,
    InferTurn,
    bytes_tensor,
    int32_tensor,
    turn_of,
)
from tokenwire.turns.events import Finished, Started
from tokenwire.turns.runner import TurnRunner

__all__ = ["INFERENCE_SERVICE_NAME", "InferenceServicer", "add_inference_service"]

INFERENCE_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_log = get_logger("tokenwire.inference")
_VERSION = "1"
_FINAL = "triton_final_response"
_EMPTY_FINAL = "triton_enable_empty_final_response"
_CONFIG_TYPES = {
    "BYTES": mc.TYPE_STRING,
    "INT32": mc.TYPE_INT32,
    "FP32": mc.TYPE_FP32,
    "UINT64": mc.TYPE_UINT64,
    "BOOL": mc.TYPE_BOOL,
}
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(slots=True)
class _Stats:
    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    last_ms: int = 0

    def record(self, ok: bool, started_ns: int) -> None:
        spent = time.monotonic_ns() - started_ns
        if ok:
            self.success += 1
            self.success_ns += spent
        else:
            self.fail += 1
            self.fail_ns += spent
        self.last_ms = time.time_ns() // 1_000_000


class _InferEvents:
    """One turn's events as ``ModelInferResponse`` messages (None: nothing to send)."""

    __slots__ = (
        "_empty_final",
        "_id",
        "_infer",
        "_model",
        "_prompt",
        "_text",
        "_tokens",
        "conversation_id",
    )

    def __init__(
        self, model: str, request_id: str, infer: InferTurn, *, empty_final: bool = False
    ) -> None:
        self._model = model
        self._empty_final = empty_final  # an empty response follows: it is the final one
        self._id = request_id
        self._infer = infer
        self._text: list[str] = []
        self._tokens = 0
        self._prompt = 0
        self.conversation_id = ""

    def started(self, event: Started) -> pb.ModelInferResponse | None:
        self.conversation_id = event.conversation_id
        return None

    def delta(self, text: str, token_count: int) -> pb.ModelInferResponse | None:
        if not self._infer.stream:
            self._text.append(text)
            self._tokens += token_count
            return None
        return self._response(text, token_count, final=False)

    def finished(self, event: Finished) -> pb.ModelInferResponse:
        self._prompt = event.usage.prompt_tokens
        text = "" if self._infer.stream else "".join(self._text)
        tokens = 0 if self._infer.stream else self._tokens
        return self._response(text, tokens, final=not self._empty_final, finished=event)

    def _response(
        self, text: str, tokens: int, *, final: bool, finished: Finished | None = None
    ) -> pb.ModelInferResponse:
        wanted = self._infer.outputs
        tensors: list[tuple[str, tuple[str, list[int], bytes]]] = []
        if "text_output" in wanted:
            tensors.append(("text_output", bytes_tensor([text])))
        if "num_input_tokens" in wanted and finished is not None:  # known at the end
            tensors.append(("num_input_tokens", int32_tensor(self._prompt)))
        if "num_output_tokens" in wanted:
            tensors.append(("num_output_tokens", int32_tensor(tokens)))
        if finished is not None:
            if "finish_reason" in wanted:
                reason = finished.finish_reason.value
                tensors.append(("finish_reason", bytes_tensor([reason])))
            if "conversation_id" in wanted:
                tensors.append(("conversation_id", bytes_tensor([self.conversation_id])))
        response = pb.ModelInferResponse(
            model_name=self._model, model_version=_VERSION, id=self._id
        )
        for name, (datatype, shape, raw) in tensors:
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(raw)
        if self._infer.stream:
            response.parameters[_FINAL].bool_param = final
        return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The Open Inference Protocol over ``runner``'s models."""

    def __init__(
        self,
        runner: TurnRunner,
        models: Mapping[str, ChatModel],
        *,
        stream_requests: int = 16,
    ) -> None:
        self._runner = runner
        self._models = dict(models)
        self._default = next(iter(self._models))
        self._draining = False
        self._streams: set[_Stream] = set()
        self._stream_requests = max(1, stream_requests)
        self._stats = {name: _Stats() for name in self._models}

    # -- server and model information --------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=not self._draining)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        return pb.ServerMetadataResponse(name="tokenwire", version=__version__, extensions=[])

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        known = request.name in self._models and request.version in ("", _VERSION)
        return pb.ModelReadyResponse(ready=known and not self._draining)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        name = self._model_name(request.name, request.version)
        response = pb.ModelMetadataResponse(name=name, versions=[_VERSION], platform="tokenwire")
        for key, (datatype, dims, _) in INPUTS.items():
            response.inputs.add(name=key, datatype=datatype, shape=[-1, *dims])
        for key, (datatype, dims) in OUTPUTS.items():
            response.outputs.add(name=key, datatype=datatype, shape=[-1, *dims])
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> Any:
        name = self._model_name(request.name, request.version)
        config = mc.ModelConfig(
            name=name,
            platform="tokenwire",
            backend="tokenwire",
            max_batch_size=1,
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        )
        for key, (datatype, dims, optional) in INPUTS.items():
            config.input.add(
                name=key, data_type=_CONFIG_TYPES[datatype], dims=list(dims), optional=optional
            )
        for key, (datatype, dims) in OUTPUTS.items():
            config.output.add(name=key, data_type=_CONFIG_TYPES[datatype], dims=list(dims))
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> Any:
        names = [self._model_name(request.name, request.version)] if request.name else self._models
        response = pb.ModelStatisticsResponse()
        for name in names:
            stats = self._stats[name]
            entry = response.model_stats.add(
                name=name,
                version=_VERSION,
                last_inference=stats.last_ms,
                inference_count=stats.success,
                execution_count=stats.success,
            )
            entry.inference_stats.success.count = stats.success
            entry.inference_stats.success.ns = stats.success_ns
            entry.inference_stats.fail.count = stats.fail
            entry.inference_stats.fail.ns = stats.fail_ns
        return response

    def _model_name(self, name: str, version: str) -> str:
        if name not in self._models or version not in ("", _VERSION):
            raise NotFoundError(
                f"model {name!r} version {version!r} is not served here; "
                f"models: {', '.join(self._models)}"
            )
        return name

    # -- inference ----------------------------------------------------------

    def drain(self) -> None:
        """Refuse new requests; end each stream once its running requests finish."""
        self._draining = True
        for stream in list(self._streams):
            stream.end_when_idle()

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        infer = self._admit(request)
        if infer.stream:
            raise InvalidArgumentError(
                "ModelInfer sends one response: stream=true needs ModelStreamInfer"
            )
        last: pb.ModelInferResponse | None = None
        async with contextlib.aclosing(self._turn(request, infer)) as responses:
            async for response in responses:
                last = response
        return last

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest | UndecodableRequest],
        context: Context,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        stream = _Stream(self._stream_requests)
        self._streams.add(stream)
        if self._draining:
            stream.end_when_idle()
        reader = asyncio.ensure_future(self._read(request_iterator, stream))
        try:
            while True:
                message = await stream.outbox.get()
                if message is None:
                    return
                yield message
        finally:
            self._streams.discard(stream)
            stream.close()
            reader.cancel()
            for task in list(stream.running):
                task.cancel()
            # Each cancelled turn closes its answer in its own task (aclosing below), so
            # what was sent is stored before the stream's status goes out.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, *stream.running, return_exceptions=True)

    async def _read(
        self,
        requests: AsyncIterator[pb.ModelInferRequest | UndecodableRequest],
        stream: _Stream,
    ) -> None:
        try:
            async for request in requests:
                if isinstance(request, UndecodableRequest):
                    await stream.put(_stream_error(InvalidArgumentError(request.message), ""))
                    continue
                if len(stream.running) >= self._stream_requests:
                    refused = ResourceExhaustedError(
                        f"this stream already runs {self._stream_requests} requests "
                        "(server.inference_stream_requests); wait for one to finish",
                        retry_after_s=1.0,
                    )
                    await stream.put(_stream_error(refused, request.id, request.model_name))
                    continue
                stream.start(self._stream_one(request, stream))
            stream.end_when_idle()  # the client closed its side: the answers still come
        except Exception:  # the request stream broke: end the call, cancelling its turns
            _log.warning("reading an inference stream failed", exc_info=True)
            stream.end_now()

    async def _stream_one(self, request: pb.ModelInferRequest, stream: _Stream) -> None:
        try:
            infer = self._admit(request)
            flag = request.parameters.get(_EMPTY_FINAL)
            empty_final = infer.stream and flag is not None and flag.bool_param
            turn = self._turn(request, infer, empty_final=empty_final)
            # Closed in this task however it ends (a cancel included): the turn stores
            # its answer and gives back its capacity before this task is done.
            async with contextlib.aclosing(turn) as responses:
                async for response in responses:
                    await stream.put(pb.ModelStreamInferResponse(infer_response=response))
            if empty_final:
                await stream.put(pb.ModelStreamInferResponse(infer_response=self._final(request)))
        except Exception as exc:
            await stream.put(_stream_error(exc, request.id, request.model_name))

    def _admit(self, request: pb.ModelInferRequest) -> InferTurn:
        started = time.monotonic_ns()
        try:
            if self._draining:
                raise UnavailableError("the server is shutting down; retry on another")
            infer = turn_of(request)
            if request.model_version not in ("", _VERSION):
                raise NotFoundError(f"model {request.model_name!r} has only version {_VERSION}")
        except Exception:  # a refused request counts as a failed one, as in Triton
            stats = self._stats.get(request.model_name or self._default)
            if stats is not None:
                stats.record(False, started)
            raise
        return infer

    async def _turn(
        self, request: pb.ModelInferRequest, infer: InferTurn, *, empty_final: bool = False
    ) -> AsyncGenerator[pb.ModelInferResponse, None]:
        events = _InferEvents(request.model_name, request.id, infer, empty_final=empty_final)
        stats = self._stats.get(request.model_name or self._default)
        started = time.monotonic_ns()
        ok = False
        try:
            turn = self._runner.run(infer.turn, current_call(), events)
            async with contextlib.aclosing(turn) as responses:
                async for response in responses:
                    if response is not None:
                        yield response
            ok = True
        finally:
            if stats is not None:
                stats.record(ok, started)

    def _final(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=_VERSION, id=request.id
        )
        response.parameters[_FINAL].bool_param = True
        return response


class _Stream:
    """One ModelStreamInfer call: its outbox and the requests it runs."""

    def __init__(self, limit: int) -> None:
        # Bounded: a client that stops reading holds its turns at their next message.
        self.outbox: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(
            maxsize=4 * limit
        )
        self.running: set[asyncio.Task[None]] = set()
        self._ending = False
        self._end: asyncio.Future[None] | None = None

    async def put(self, message: pb.ModelStreamInferResponse) -> None:
        await self.outbox.put(message)

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self.running.add(task)
        task.add_done_callback(self._done)

    def end_when_idle(self) -> None:
        """End the call once no request runs (now, if none does)."""
        self._ending = True
        if not self.running:
            self.end_now()

    def end_now(self) -> None:
        if self._end is None:
            # A task, not put_nowait: the outbox may be full of answers still to send.
            self._end = asyncio.ensure_future(self.outbox.put(None))

    def close(self) -> None:
        """The call is over: nothing more goes into the outbox."""
        if self._end is not None:
            self._end.cancel()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        if self._ending and not self.running:
            self.end_now()


def _stream_error(
    exc: BaseException, request_id: str, model: str = ""
) -> pb.ModelStreamInferResponse:
    """A failed request, reported in the stream (which stays open) as Triton does."""
    code, message, _ = status_of(exc)
    if code is Code.INTERNAL:  # the client sees only the request id to quote
        _log.exception("inference request failed", request_id=request_id, exc_info=exc)
    return pb.ModelStreamInferResponse(
        error_message=f"{code.name}: {message}",
        infer_response=pb.ModelInferResponse(id=request_id, model_name=model),
    )


def add_inference_service(server: grpc.aio.Server, servicer: InferenceServicer) -> str:
    """Serve ``servicer`` on ``server``; returns the service's full name."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return str(INFERENCE_SERVICE_NAME)
