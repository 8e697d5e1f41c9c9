"""OpenAI-shaped errors: a gRPC status becomes an HTTP status, an error body and headers.

The one place the OpenAI edge maps the gateway's refusals: the status code picks
the HTTP status and OpenAI's error ``type``; the gateway's ``x-error-type`` trailer,
when it says more than the status, becomes the ``code``; a RetryInfo detail becomes
``retry-after``; and an unknown status tells the client nothing of the internals.
No HTTP responses here, only their parts::

    status, body, headers = status_error(exc)  # exc: grpc.aio.AioRpcError
    error_body("messages must be a non-empty list", "invalid_request_error", None, "messages")
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = ["error_body", "status_error"]

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


def status_error(exc: grpc.aio.AioRpcError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, OpenAI error body and headers for a gRPC status."""
    known = _HTTP.get(exc.code())
    error_type = _trailing(exc, "x-error-type")
    if known is None:  # internals stay inside: only the gateway's own safe message goes out
        safe = exc.code() == grpc.StatusCode.INTERNAL and error_type is not None
        message = exc.details() if safe else "the server failed to answer"
        return 500, error_body(message or "internal error", "server_error", None, None), {}
    status, kind, code = known
    if isinstance(error_type, str) and error_type != exc.code().name.lower():
        code = error_type  # the gateway says more than the status, e.g. "content_filter"
    headers = {}
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = _retry_after_s(exc)
        if retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(retry_after)))
            headers["retry-after-ms"] = str(round(retry_after * 1000))
    return status, error_body(exc.details() or "", kind, code, None), headers


def error_body(message: str, kind: str, code: str | None, param: str | None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
