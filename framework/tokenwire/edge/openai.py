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

This module holds the routes and the answer (the JSON completion, the event
stream, the client's disconnect); :mod:`tokenwire.edge.openai_request` reads and
checks the request, and :mod:`tokenwire.edge.openai_errors` maps a gRPC status to
OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from tokenwire.edge.config import HttpConfig
from tokenwire.edge.openai_errors import error_body, status_error
from tokenwire.edge.openai_request import (
    BadRequestError,
    complete_request,
    forwarded_metadata,
    read_json_body,
)
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc, models_pb2, models_pb2_grpc

__all__ = ["CONVERSATION_HEADER", "openai_routes"]

CONVERSATION_HEADER = "x-tokenwire-conversation-id"
_FINISH = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    chat_pb2.FINISH_REASON_CANCELLED: "stop",
}


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
                models_pb2.ListModelsRequest(), metadata=forwarded_metadata(request)
            )
        except grpc.aio.AioRpcError as exc:
            return _status_response(exc)

    async def chat_completions(self, request: Any) -> Any:
        try:
            body = await read_json_body(request, self._max_body)
            turn, stream, include_usage = complete_request(body)
        except BadRequestError as exc:
            return _error(exc.status, exc.message, "invalid_request_error", None, exc.param)
        call = self._chat.Complete(turn, metadata=forwarded_metadata(request))
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
        _, body, _ = status_error(exc)
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


# --- responses -------------------------------------------------------------------------


def _status_response(exc: grpc.aio.AioRpcError) -> Any:
    status, body, headers = status_error(exc)
    return _json(body, status, headers)


def _error(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> Any:
    return _json(error_body(message, kind, code, param), status)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(data, status, headers=headers)


def _model(model: models_pb2.Model) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "tokenwire"}
