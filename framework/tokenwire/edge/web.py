"""Browsers on the same protos: Connect and gRPC-Web, bridged per method with no code per RPC.

``POST /<package.Service>/<Method>`` for every method of the public services
(Chat, Conversations, Models, Admin) is forwarded as raw bytes over the channel to
the gateway's own gRPC server, so a browser's call passes the same interceptors and
per-turn policies as a native one. The request's Content-Type picks the protocol:

* gRPC-Web (``application/grpc-web[+proto]``, base64 ``application/grpc-web-text``):
  length-prefixed frames both ways, the status in a final trailer frame (flag 0x80);
* Connect unary (``application/proto``, ``application/json``): the bare message, errors
  as ``{"code": "unauthenticated", "message": ...}`` with the matching HTTP status;
* Connect streaming (``application/connect+proto``, ``application/connect+json``):
  enveloped messages, then an end-stream envelope (flag 0x02) with the error, if any,
  and the trailers.

Client-streaming and bidirectional methods (Converse) need full-duplex HTTP/2, which
a browser's fetch cannot open: they are refused as unimplemented. Browsers run turns
with Complete and cancel one by aborting the fetch, which cancels the gRPC call.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tokenwire.edge.wire import (
    BRIDGED_SERVICES,
    DEFAULT_MAX_BODY_BYTES,
    Metadata,
    Method,
    Refused,
    Status,
    WireProtocol,
    bridged_methods,
    call_metadata,
    end_stream,
    frame,
    pairs,
    protocol_of,
    read_body,
    refusal,
    refuse,
    request_payload,
    timeout_of,
    to_json,
    with_headers,
)

__all__ = ["BRIDGED_SERVICES", "web_routes"]


class _Bridge:
    """The endpoint behind ``POST /<package.Service>/<Method>``."""

    def __init__(self, channel: grpc.aio.Channel, max_body_bytes: int) -> None:
        self._channel = channel
        self._max_body_bytes = max_body_bytes
        self._methods = bridged_methods()

    async def handle(self, request: Request) -> Response:
        protocol = protocol_of(request)
        try:
            if protocol is None:
                content_type = request.headers.get("content-type", "")
                raise refuse(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"unsupported content-type {content_type!r}: use application/grpc-web, "
                    "application/json, application/proto or application/connect+proto",
                    http_status=415,
                )
            method = self._methods.get(request.url.path)
            if method is None:
                raise refuse(grpc.StatusCode.UNIMPLEMENTED, f"no method {request.url.path}", 404)
            if method.client_streaming:
                raise refuse(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{method.path} streams requests, which needs full-duplex HTTP/2 that "
                    "browsers cannot open; use /tokenwire.v1.ChatService/Complete for a "
                    "turn and abort the fetch to cancel it",
                )
            if method.server_streaming and protocol.name == "connect":
                raise refuse(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{method.path} streams its replies: send application/connect+proto "
                    "or application/connect+json",
                    http_status=415,
                )
            for header in ("content-encoding", "connect-content-encoding", "grpc-encoding"):
                if request.headers.get(header, "identity") != "identity":
                    raise refuse(
                        grpc.StatusCode.UNIMPLEMENTED,
                        f"{header} {request.headers[header]!r}: only identity is served",
                    )
            version = request.headers.get("connect-protocol-version")
            if protocol.connect and version not in (None, "1"):
                raise refuse(
                    grpc.StatusCode.INVALID_ARGUMENT, f"connect-protocol-version {version!r}"
                )
            timeout = timeout_of(request, protocol.connect)
            metadata = call_metadata(request)
            body = await read_body(request, self._max_body_bytes)
            payload = request_payload(protocol, method, body)
        except Refused as refused:
            return refusal(protocol, refused.status)
        if protocol.name == "connect":
            return await self._unary(protocol, method, payload, metadata, timeout)
        return await self._stream(protocol, method, payload, metadata, timeout)

    async def _unary(
        self,
        protocol: WireProtocol,
        method: Method,
        payload: bytes,
        metadata: Metadata,
        deadline_s: float | None,
    ) -> Response:
        """Connect unary: the bare message, or a JSON error; trailers as trailer-* headers."""
        call = self._channel.unary_unary(method.path, None, None)(
            payload, metadata=metadata, timeout=deadline_s
        )
        try:
            reply: bytes = await call
        except grpc.aio.AioRpcError as error:
            status = Status.of(error)
            initial = pairs(await call.initial_metadata())
            merged = Status(status.code, status.message, (*initial, *status.trailing))
            return refusal(protocol, merged)
        except BaseException:
            call.cancel()
            raise
        content = to_json(method, reply) if protocol.json else reply
        response = Response(content, media_type=protocol.content_type)
        with_headers(response, pairs(await call.initial_metadata()))
        return with_headers(response, pairs(await call.trailing_metadata()), "trailer-")

    async def _stream(
        self,
        protocol: WireProtocol,
        method: Method,
        payload: bytes,
        metadata: Metadata,
        deadline_s: float | None,
    ) -> Response:
        """gRPC-Web and Connect streaming: frames as the replies come, then the status."""
        call = self._channel.unary_stream(method.path, None, None)(
            payload, metadata=metadata, timeout=deadline_s
        )
        try:
            initial = pairs(await call.initial_metadata())
        except BaseException:
            call.cancel()
            raise
        encode: Callable[[bytes], bytes] = (
            (lambda reply: to_json(method, reply)) if protocol.json else (lambda reply: reply)
        )
        response = StreamingResponse(
            _relay(protocol, call, encode), media_type=protocol.content_type
        )
        return with_headers(response, initial)


async def _relay(
    protocol: WireProtocol,
    call: grpc.aio.UnaryStreamCall[bytes, bytes],
    encode: Callable[[bytes], bytes],
) -> AsyncIterator[bytes]:
    """Yields the call's replies framed, then its end; cancels the call if the client left."""
    wrap: Callable[[bytes], bytes] = (
        (lambda data: base64.b64encode(data)) if protocol.text else (lambda data: data)
    )
    try:
        async for reply in call:
            yield wrap(frame(0x00, encode(reply)))
        status = Status(grpc.StatusCode.OK, "", pairs(await call.trailing_metadata()))
    except grpc.aio.AioRpcError as error:
        status = Status.of(error)
    finally:
        # Reached by a disconnect too (Starlette cancels the response): the call, and
        # with it the turn and the engine's work, stops here.
        call.cancel()
    yield wrap(end_stream(protocol, status))


def web_routes(
    channel: grpc.aio.Channel, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> Sequence[Any]:
    """Connect and gRPC-Web for every method of the public services, over ``channel``.

    >>> routes = web_routes(channel, max_body_bytes=1 << 20)  # doctest: +SKIP
    """
    bridge = _Bridge(channel, max_body_bytes)
    # Only the bridged packages' paths, so other routes' paths (POST /v1/models) stay theirs.
    packages = sorted({name.rpartition(".")[0] for name in BRIDGED_SERVICES})
    return [
        Route(f"/{package}.{{service}}/{{method}}", bridge.handle, methods=["POST"])
        for package in packages
    ]
