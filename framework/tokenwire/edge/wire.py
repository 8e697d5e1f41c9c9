"""The wire of the web edge: Connect and gRPC-Web framing, JSON, metadata and errors.

What :mod:`tokenwire.edge.web` needs to read a browser's request and write the
answer in the protocol it spoke; no routing and no gRPC calls here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from starlette.requests import Request
from starlette.responses import Response

from tokenwire.edge.config import HttpConfig
from tokenwire.proto.v1 import admin_pb2, chat_pb2, conversations_pb2, models_pb2

__all__ = [
    "BRIDGED_SERVICES",
    "DEFAULT_MAX_BODY_BYTES",
    "Metadata",
    "Method",
    "Refused",
    "Status",
    "WireProtocol",
    "bridged_methods",
    "call_metadata",
    "end_stream",
    "frame",
    "pairs",
    "protocol_of",
    "read_body",
    "refusal",
    "refuse",
    "request_payload",
    "timeout_of",
    "to_json",
    "with_headers",
]


# Importing the generated modules registers their files in the default pool.
_REGISTERED = (admin_pb2, chat_pb2, conversations_pb2, models_pb2)
BRIDGED_SERVICES = (
    "tokenwire.v1.ChatService",
    "tokenwire.v1.ConversationService",
    "tokenwire.v1.ModelService",
    "tokenwire.v1.AdminService",
)
_DETAILS_KEY = "grpc-status-details-bin"
DEFAULT_MAX_BODY_BYTES = HttpConfig().max_body_bytes
# Never forwarded as call metadata: hop-by-hop and body headers, the protocols' own,
# the browser's fetch bookkeeping, and cookies (a browser attaches those to any site's
# request by itself; credentials must come in Authorization, which a page sets).
_DROPPED_HEADERS = frozenset(
    (
        *("connection", "keep-alive", "proxy-authenticate", "proxy-authorization"),
        *("proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"),
        *("content-type", "content-length", "content-encoding", "accept", "accept-encoding"),
        *("accept-language", "user-agent", "x-user-agent", "origin", "referer", "cookie"),
        *("cache-control", "pragma", "priority", "dnt"),
    )
)
_DROPPED_PREFIXES = ("connect-", "grpc-", "sec-", "access-control-", "x-grpc-web")
_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_BASE64_SEGMENT = re.compile(rb"[A-Za-z0-9+/]+=*")
# Connect's HTTP status for each code (connectrpc.com/docs/protocol#error-codes).
_CONNECT_HTTP = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class Method:
    """One bridged RPC, as the descriptor pool describes it."""

    path: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


@dataclass(frozen=True, slots=True)
class Status:
    """How a call ended: its code, message, and trailing metadata (details included)."""

    code: grpc.StatusCode
    message: str = ""
    trailing: Metadata = ()
    http_status: int | None = None  # the bridge's own refusals (404, 413) say theirs

    @classmethod
    def of(cls, error: grpc.aio.AioRpcError) -> Status:
        return cls(error.code(), error.details() or "", pairs(error.trailing_metadata()))


class Refused(Exception):
    """The bridge refuses a request before any call is made."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.message)
        self.status = status


def pairs(metadata: Any) -> Metadata:
    return tuple((key, value) for key, value in metadata or ())


def refuse(code: grpc.StatusCode, message: str, http_status: int | None = None) -> Refused:
    return Refused(Status(code, message, http_status=http_status))


def bridged_methods() -> dict[str, Method]:
    pool = descriptor_pool.Default()
    methods = {}
    for name in BRIDGED_SERVICES:
        for method in pool.FindServiceByName(name).methods:
            path = f"/{name}/{method.name}"
            methods[path] = Method(
                path,
                message_factory.GetMessageClass(method.input_type),
                message_factory.GetMessageClass(method.output_type),
                method.client_streaming,
                method.server_streaming,
            )
    return methods


# --- the wire: frames, base64, JSON -------------------------------------------------


def frame(flags: int, payload: bytes) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def _single_frame(body: bytes, what: str) -> bytes:
    """The one message of a unary request body framed as gRPC-Web or Connect envelopes."""
    if len(body) < 5:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: a 5-byte frame header")
    flags, length = struct.unpack(">BI", body[:5])
    if flags & 0x01:
        raise refuse(grpc.StatusCode.UNIMPLEMENTED, f"{what}: compressed messages")
    if flags != 0 or len(body) != 5 + length:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: exactly one message frame")
    return body[5:]


def _b64decode(text: bytes) -> bytes:
    """Base64 that may be a concatenation of padded chunks (gRPC-Web text)."""
    text = b"".join(text.split())
    if _BASE64_SEGMENT.sub(b"", text):
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, "grpc-web-text: the body is not base64")
    try:
        return b"".join(base64.b64decode(m.group()) for m in _BASE64_SEGMENT.finditer(text))
    except binascii.Error as exc:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"grpc-web-text: {exc}") from None


def _from_json(method: Method, body: bytes) -> bytes:
    try:
        message = json_format.Parse(body, method.request(), ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"request JSON: {exc}") from None
    return message.SerializeToString()


def to_json(method: Method, payload: bytes) -> bytes:
    message = method.response.FromString(payload)
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()


def _percent_encode(text: str) -> str:
    """grpc-message's encoding: printable ASCII but '%' as is, everything else %XX."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode()
    )


def _header_value(key: str, value: str | bytes) -> str:
    """A metadata value as a header's: binary (``-bin``) values in base64."""
    if isinstance(value, bytes) or key.endswith("-bin"):
        return base64.b64encode(value if isinstance(value, bytes) else value.encode()).decode()
    return value


# --- headers in, metadata and deadlines ---------------------------------------------


def call_metadata(request: Request) -> Metadata:
    """The browser's own headers, as gRPC call metadata."""
    metadata: list[tuple[str, str | bytes]] = []
    for key, value in request.headers.items():  # lower-cased by the ASGI server
        if key in _DROPPED_HEADERS or key.startswith(_DROPPED_PREFIXES):
            continue
        if not _METADATA_KEY.match(key):
            continue
        if key.endswith("-bin"):
            try:
                metadata.append((key, base64.b64decode(value + "=" * (-len(value) % 4))))
            except binascii.Error:
                raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{key}: not base64") from None
        elif _PRINTABLE.match(value):
            metadata.append((key, value))
    return metadata


def timeout_of(request: Request, connect: bool) -> float | None:
    """The call's deadline in seconds: Connect-Timeout-Ms or gRPC-Web's grpc-timeout."""
    if connect:
        value = request.headers.get("connect-timeout-ms")
        if value is None:
            return None
        if not (value.isdigit() and len(value) <= 10):
            raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"connect-timeout-ms: {value!r}")
        return int(value) / 1000
    value = request.headers.get("grpc-timeout")
    if value is None:
        return None
    match = _GRPC_TIMEOUT.match(value)
    if match is None:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"grpc-timeout: {value!r}")
    return int(match.group(1)) * _GRPC_TIMEOUT_UNITS[match.group(2)]


async def read_body(request: Request, limit: int) -> bytes:
    too_large = refuse(
        grpc.StatusCode.RESOURCE_EXHAUSTED, f"request body over {limit} bytes", http_status=413
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


# --- the protocols ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireProtocol:
    """How one Content-Type frames messages and reports the call's end."""

    name: str  # "grpc-web", "connect", "connect-stream"
    content_type: str  # what the responses say
    json: bool = False
    text: bool = False

    @property
    def connect(self) -> bool:
        return self.name != "grpc-web"


_PROTOCOLS = {
    "application/grpc-web": WireProtocol("grpc-web", "application/grpc-web+proto"),
    "application/grpc-web+proto": WireProtocol("grpc-web", "application/grpc-web+proto"),
    "application/grpc-web-text": WireProtocol(
        "grpc-web", "application/grpc-web-text+proto", text=True
    ),
    "application/grpc-web-text+proto": WireProtocol(
        "grpc-web", "application/grpc-web-text+proto", text=True
    ),
    "application/proto": WireProtocol("connect", "application/proto"),
    "application/json": WireProtocol("connect", "application/json", json=True),
    "application/connect+proto": WireProtocol("connect-stream", "application/connect+proto"),
    "application/connect+json": WireProtocol(
        "connect-stream", "application/connect+json", json=True
    ),
}


def protocol_of(request: Request) -> WireProtocol | None:
    content_type = request.headers.get("content-type", "")
    media, _, params = content_type.partition(";")
    charset = params.strip().lower()
    if charset and charset not in ("charset=utf-8", 'charset="utf-8"'):
        return None
    return _PROTOCOLS.get(media.strip().lower())


def request_payload(protocol: WireProtocol, method: Method, body: bytes) -> bytes:
    """The request message's protobuf bytes, out of the protocol's framing."""
    if protocol.name == "grpc-web":
        framed = _b64decode(body) if protocol.text else body
        return _checked(method, _single_frame(framed, "grpc-web"))
    payload = body if protocol.name == "connect" else _single_frame(body, "connect envelope")
    if protocol.json:
        return _from_json(method, payload)
    return _checked(method, payload)


def _checked(method: Method, payload: bytes) -> bytes:
    """``payload``, once it parses as the request message (the bridge answers why not)."""
    try:
        method.request.FromString(payload)
    except DecodeError as exc:
        raise refuse(grpc.StatusCode.INVALID_ARGUMENT, f"request message: {exc}") from None
    return payload


def _connect_error(status: Status) -> dict[str, Any]:
    code = "canceled" if status.code is grpc.StatusCode.CANCELLED else status.code.name.lower()
    error: dict[str, Any] = {"code": code}
    if status.message:
        error["message"] = status.message
    details = []
    for key, value in status.trailing:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                details.append(
                    {
                        "type": detail.type_url.rpartition("/")[2],
                        "value": base64.b64encode(detail.value).decode().rstrip("="),
                    }
                )
    if details:
        error["details"] = details
    return error


def _grpc_web_trailers(status: Status) -> bytes:
    lines = [
        f"grpc-status:{status.code.value[0]}",
        f"grpc-message:{_percent_encode(status.message)}",
    ]
    lines += [f"{key}:{_header_value(key, value)}" for key, value in status.trailing]
    return frame(0x80, "".join(f"{line}\r\n" for line in lines).encode())


def end_stream(protocol: WireProtocol, status: Status) -> bytes:
    """The last bytes of a streamed response: gRPC-Web trailers or Connect's end-stream."""
    if protocol.name == "grpc-web":
        return _grpc_web_trailers(status)
    end: dict[str, Any] = {}
    if status.code is not grpc.StatusCode.OK:
        end["error"] = _connect_error(status)
    metadata: dict[str, list[str]] = {}
    for key, value in status.trailing:
        if key != _DETAILS_KEY:
            metadata.setdefault(key, []).append(_header_value(key, value))
    if metadata:
        end["metadata"] = metadata
    return frame(0x02, json.dumps(end, separators=(",", ":")).encode())


def refusal(protocol: WireProtocol | None, status: Status) -> Response:
    """A response for a call that never reached the gateway (or a Connect unary error)."""
    if protocol is None:
        return Response(f"{status.message}\n", status.http_status or 415, media_type="text/plain")
    if protocol.connect:
        http_status = status.http_status or _CONNECT_HTTP.get(status.code, 500)
        response = Response(
            json.dumps(_connect_error(status)), http_status, media_type="application/json"
        )
        for key, value in status.trailing:
            if key != _DETAILS_KEY:
                response.headers.append(key, _header_value(key, value))
        return response
    # gRPC-Web: a trailers-only answer in the headers. Its clients read grpc-status from
    # a 200; a request the bridge cannot read at all is a plain 400.
    invalid = status.code is grpc.StatusCode.INVALID_ARGUMENT
    http_status = status.http_status or (400 if invalid else 200)
    headers = {"grpc-status": str(status.code.value[0])}
    headers["grpc-message"] = _percent_encode(status.message)
    return Response(b"", http_status, headers=headers, media_type=protocol.content_type)


def with_headers(response: Response, metadata: Metadata, prefix: str = "") -> Response:
    for key, value in metadata:
        response.headers.append(prefix + key, _header_value(key, value))
    return response
