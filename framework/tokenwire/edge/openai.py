"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Each call becomes one gRPC call to the gateway's own ``ChatService.Complete`` or
``ModelService.ListModels`` over the edge's channel, carrying the request's
``authorization`` header as call metadata, so authentication, quotas and
moderation are exactly those of the gRPC API. OpenAI clients send the whole
conversation: its earlier messages go as ``CompleteRequest.context`` and the last
user message as the turn's message. The extension field ``conversation_id``
continues a stored conversation instead (the earlier messages are then ignored);
every answer names its conversation (``conversation_id`` and the
``x-tokenwire-conversation-id`` header)::

    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:8080/v1", api_key="tw_...")
    await client.chat.completions.create(model="fake", messages=[...], stream=True)

A refusal before the first token is an HTTP error in OpenAI's shape; a failure
mid-stream ends the event stream with an ``error`` event. A client that leaves
cancels the gRPC call, which stops the engine within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from tokenwire.edge.config import HttpConfig
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc, models_pb2, models_pb2_grpc

__all__ = ["CONVERSATION_HEADER", "openai_routes"]

CONVERSATION_HEADER = "x-tokenwire-conversation-id"
_FORWARDED = ("authorization", "x-request-id")  # HTTP headers passed on as call metadata
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    chat_pb2.FINISH_REASON_CANCELLED: "stop",
}
# gRPC status -> (HTTP status, OpenAI error type, code when the gateway names none).
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.ABORTED: (409, "invalid_request_error", "aborted"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}


class _BadRequest(Exception):
    """The HTTP request itself is malformed: 400 (or ``status``) before any gRPC call."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def openai_routes(
    channel: grpc.aio.Channel, *, max_body_bytes: int = HttpConfig().max_body_bytes
) -> Sequence[Any]:
    """The Starlette routes of the OpenAI-compatible API, served over ``channel``."""
    from starlette.routing import Route

    api = _OpenAiApi(channel, max_body_bytes)
    return [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.get_model, methods=["GET"]),
    ]


class _OpenAiApi:
    def __init__(self, channel: grpc.aio.Channel, max_body_bytes: int) -> None:
        self._chat = chat_pb2_grpc.ChatServiceStub(channel)
        self._models = models_pb2_grpc.ModelServiceStub(channel)
        self._max_body = max_body_bytes

    async def list_models(self, request: Any) -> Any:
        listed = await self._list(request)
        if not isinstance(listed, models_pb2.ListModelsResponse):
            return listed
        return _json({"object": "list", "data": [_model(m) for m in listed.models]})

    async def get_model(self, request: Any) -> Any:
        listed = await self._list(request)
        if not isinstance(listed, models_pb2.ListModelsResponse):
            return listed
        name = request.path_params["model"]
        found = [m for m in listed.models if m.name == name]
        if not found:
            return _error(404, f"model {name!r} is not served here", "invalid_request_error",
                          "model_not_found", "model")  # fmt: skip
        return _json(_model(found[0]))

    async def _list(self, request: Any) -> Any:
        try:
            return await self._models.ListModels(
                models_pb2.ListModelsRequest(), metadata=_metadata(request)
            )
        except grpc.aio.AioRpcError as exc:
            return _status_response(exc)

    async def chat_completions(self, request: Any) -> Any:
        try:
            body = await _read_json(request, self._max_body)
            turn, stream, include_usage = _complete_request(body)
        except _BadRequest as exc:
            return _error(exc.status, exc.message, "invalid_request_error", None, exc.param)
        call = self._chat.Complete(turn, metadata=_metadata(request))
        events = aiter(call)
        try:
            first = await _next(events)  # TurnStarted: the turn was admitted
        except grpc.aio.AioRpcError as exc:
            return _status_response(exc)
        except BaseException:
            call.cancel()
            raise
        if first is None or first.WhichOneof("event") != "started":
            call.cancel()
            return _error(500, "the server ended the turn before it started", "server_error")
        started = first.started
        headers = {CONVERSATION_HEADER: started.conversation_id}
        if stream:
            return _EventStream(_sse(events, started, include_usage), headers, call.cancel)
        try:
            answer = await _until_disconnect(request.receive, _collect(events, started))
        except grpc.aio.AioRpcError as exc:
            return _status_response(exc)
        finally:
            call.cancel()  # nothing if it ended; a client that left stops the engine
        if answer is _GONE:
            return _error(499, "the client closed the request", "invalid_request_error")
        return _json(answer, headers=headers)


# --- the request -----------------------------------------------------------------------


async def _read_json(request: Any, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(f"the request body is over {limit} bytes", status=413)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _BadRequest(f"the request body is over {limit} bytes", status=413)
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest("the request body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise _BadRequest("the request body must be a JSON object")
    return parsed


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise _BadRequest(f"{name} must be {what}", name)
    return value


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    param = f"messages[{index}].content"
    if not isinstance(content, list):
        raise _BadRequest(f"{param} must be a string or a list of text parts", param)
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text"):
            raise _BadRequest(f"{param}: only text parts are supported", param)
        text = part.get("text")
        if not isinstance(text, str):
            raise _BadRequest(f"{param}: a text part's text must be a string", param)
        texts.append(text)
    return "".join(texts)


def _complete_request(body: dict[str, Any]) -> tuple[chat_pb2.CompleteRequest, bool, bool]:
    """The CompleteRequest an OpenAI request asks for, whether to stream, whether to add usage."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list", "messages")
    context = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRequest(f"messages[{i}] must be an object", f"messages[{i}]")
        role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise _BadRequest(
                f"messages[{i}].role must be one of {', '.join(_ROLES)}, "
                f"got {message.get('role')!r}",
                f"messages[{i}].role",
            )
        context.append(chat_pb2.ContextMessage(role=role, content=_content(message, i)))
    last = context.pop()
    if last.role != "user":
        raise _BadRequest("the last message must be the user's", f"messages[{len(context)}]")
    conversation_id = _field(body, "conversation_id", (str,), "a string") or ""
    model = _field(body, "model", (str,), "a string") or ""
    n = _field(body, "n", (int,), "an integer")
    if n not in (None, 1):
        raise _BadRequest("only n=1 is supported", "n")
    params = chat_pb2.SamplingParams()
    temperature = _field(body, "temperature", (int, float), "a number")
    if temperature is not None:
        params.temperature = temperature
    top_p = _field(body, "top_p", (int, float), "a number")
    if top_p is not None:
        params.top_p = top_p
    max_tokens = _field(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", (int,), "an integer")
    if max_tokens is not None:
        if not 1 <= max_tokens < 2**31:
            raise _BadRequest("max_tokens must be a positive integer", "max_tokens")
        params.max_tokens = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        params.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        params.stop.extend(stop)
    elif stop is not None:
        raise _BadRequest("stop must be a string or a list of strings", "stop")
    seed = _field(body, "seed", (int,), "an integer")
    if seed is not None:
        if not -(2**63) <= seed < 2**63:
            raise _BadRequest("seed must fit in 64 bits", "seed")
        params.seed = seed
    stream = bool(_field(body, "stream", (bool,), "a boolean"))
    options = _field(body, "stream_options", (dict,), "an object") or {}
    include_usage = bool(_field(options, "include_usage", (bool,), "a boolean"))
    request = chat_pb2.CompleteRequest(
        conversation_id=conversation_id,
        message=last.content,
        params=params,
        model=model,
        # A stored conversation is the history: the client's copy of it is not sent.
        context=[] if conversation_id else context,
    )
    return request, stream, include_usage


def _metadata(request: Any) -> tuple[tuple[str, str], ...]:
    return tuple(
        (name, value) for name in _FORWARDED if (value := request.headers.get(name)) is not None
    )


# --- the answer ------------------------------------------------------------------------


async def _next(events: AsyncIterator[chat_pb2.CompleteResponse]) -> Any:
    return await anext(events, None)


def _usage(usage: chat_pb2.Usage) -> dict[str, int]:
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _envelope(started: chat_pb2.TurnStarted, kind: str, created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{started.turn_id}",
        "object": kind,
        "created": created,
        "model": started.model,
        "system_fingerprint": None,
        "conversation_id": started.conversation_id,
    }


async def _collect(events: AsyncIterator[Any], started: chat_pb2.TurnStarted) -> dict[str, Any]:
    created, texts = int(time.time()), []
    finished = None
    while (event := await _next(events)) is not None:
        kind = event.WhichOneof("event")
        if kind == "delta":
            texts.append(event.delta.text)
        elif kind == "finished":
            finished = event.finished
    if finished is None or finished.finish_reason == chat_pb2.FINISH_REASON_ERROR:
        raise _failed()
    message = {"role": "assistant", "content": "".join(texts), "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": _FINISH.get(finished.finish_reason, "stop")}  # fmt: skip
    return {
        **_envelope(started, "chat.completion", created),
        "choices": [choice],
        "usage": _usage(finished.usage),
    }


def _failed() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        "the model failed while answering",
        None,
    )


async def _sse(
    events: AsyncIterator[Any], started: chat_pb2.TurnStarted, include_usage: bool
) -> AsyncIterator[bytes]:
    envelope = _envelope(started, "chat.completion.chunk", int(time.time()))
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _event({**envelope, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    try:
        while (event := await _next(events)) is not None:
            kind = event.WhichOneof("event")
            if kind == "delta":
                yield chunk({"content": event.delta.text})
            elif kind == "finished":
                finished = event.finished
                if finished.finish_reason == chat_pb2.FINISH_REASON_ERROR:
                    raise _failed()
                yield chunk({}, _FINISH.get(finished.finish_reason, "stop"))
                if include_usage:
                    yield _event({**envelope, "choices": [], "usage": _usage(finished.usage)})
    except grpc.aio.AioRpcError as exc:
        _, body, _ = _status_error(exc)
        yield _event(body)
        return
    yield b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _EventStream:
    """Server-sent events that stop (``on_close``) as soon as the client leaves."""

    def __init__(
        self, events: AsyncIterator[bytes], headers: dict[str, str], on_close: Callable[[], Any]
    ) -> None:
        self._events = events
        self._headers = [(k.encode(), v.encode()) for k, v in headers.items()]
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *self._headers,
        ]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})

            async def send_all() -> None:
                async for data in self._events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})

            with contextlib.suppress(OSError):  # the client left while we wrote
                await _until_disconnect(receive, send_all())
        finally:
            self._on_close()  # cancels the gRPC call: the engine stops within a step
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()


_GONE = object()  # what work "returns" when the client left first


async def _until_disconnect(receive: Any, work: Awaitable[Any]) -> Any:
    """``work``'s result, or ``_GONE`` (``work`` cancelled) if the client disconnects first."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (watcher, task):
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
    return _GONE if task.cancelled() else task.result()


# --- errors ----------------------------------------------------------------------------


def _trailing(exc: grpc.aio.AioRpcError, key: str) -> Any:
    metadata: Any = exc.trailing_metadata() or ()
    for name, value in metadata:
        if name == key:
            return value
    return None


def _retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    raw = _trailing(exc, "grpc-status-details-bin")
    if not isinstance(raw, bytes):
        return None
    try:
        status = status_pb2.Status.FromString(raw)
    except Exception:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def _status_error(exc: grpc.aio.AioRpcError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, OpenAI error body and headers for a gRPC status."""
    known = _HTTP.get(exc.code())
    error_type = _trailing(exc, "x-error-type")
    if known is None:  # internals stay inside: only the gateway's own safe message goes out
        safe = exc.code() == grpc.StatusCode.INTERNAL and error_type is not None
        message = exc.details() if safe else "the server failed to answer"
        return 500, _body(message or "internal error", "server_error", None, None), {}
    status, kind, code = known
    if isinstance(error_type, str) and error_type != exc.code().name.lower():
        code = error_type  # the gateway says more than the status, e.g. "content_filter"
    headers = {}
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = _retry_after_s(exc)
        if retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(retry_after)))
            headers["retry-after-ms"] = str(round(retry_after * 1000))
    return status, _body(exc.details() or "", kind, code, None), headers


def _body(message: str, kind: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _status_response(exc: grpc.aio.AioRpcError) -> Any:
    status, body, headers = _status_error(exc)
    return _json(body, status, headers)


def _error(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> Any:
    return _json(_body(message, kind, code, param), status)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(data, status, headers=headers)


def _model(model: models_pb2.Model) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "tokenwire"}
