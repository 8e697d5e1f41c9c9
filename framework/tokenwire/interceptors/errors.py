"""The outermost interceptor: request ids, call logging, and the one error-to-status map.

Every call gets a request id (the client's ``x-request-id`` when it is sane, else a
new one), bound to the call's contextvars so every log line carries it, and sent
back as initial metadata. Any exception, raised before the first response or
mid-stream, ends the call here and only here with the status from
:func:`tokenwire.errors.status_of`; unknown errors become INTERNAL and their
stack trace goes to the log, never to the client.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tokenwire.context import CallState, bind_call
from tokenwire.errors import Code, TokenwireError, status_of
from tokenwire.interceptors.base import CallInfo, Interceptor, Proceed
from tokenwire.logs import get_logger
from tokenwire.streams import closing

__all__ = ["REQUEST_ID_HEADER", "ErrorsInterceptor"]

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_log = get_logger("tokenwire.rpc")


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _SANE_ID.match(value):
            return value
    return f"{random.getrandbits(128):032x}"  # names a call in logs; guards nothing


def _status(code: Code, message: str, exc: Exception) -> grpc.Status:
    """The call's final status with google.rpc details (RetryInfo, QuotaFailure, ...)."""
    status = status_pb2.Status(code=int(code), message=message)
    retry_after_s = exc.retry_after_s if isinstance(exc, TokenwireError) else None
    if retry_after_s is not None:
        seconds = max(0.0, retry_after_s)
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
    if isinstance(exc, TokenwireError) and code is not Code.INTERNAL:
        for message_detail in exc.details:
            detail = any_pb2.Any()
            detail.Pack(message_detail)
            status.details.append(detail)
    return rpc_status.to_status(status)


class ErrorsInterceptor(Interceptor):
    """Binds the request id, logs each call once, and maps every error to a status."""

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        request_id = _request_id(context)
        bind_call(CallState(request_id=request_id, method=call.method))
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, method=call.method)
        await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        start = time.perf_counter()
        try:
            result = await proceed(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(context, exc, start)
        if not call.response_streaming:
            _log.info("rpc finished", code="OK", duration_ms=_ms(start))
            return result
        return self._stream(result, context, start)

    async def _stream(
        self,
        responses: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        start: float,
    ) -> AsyncIterator[Any]:
        sent = 0
        try:
            async with closing(responses):
                async for response in responses:
                    yield response
                    sent += 1
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(context, exc, start, sent=sent)
        except BaseException:
            # Client cancel, disconnect or deadline: the task is cancelled under us.
            _log.info("rpc cancelled", duration_ms=_ms(start), messages=sent)
            raise
        _log.info("rpc finished", code="OK", duration_ms=_ms(start), messages=sent)

    async def _abort(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        exc: Exception,
        start: float,
        sent: int | None = None,
    ) -> NoReturn:
        code, message, error_type = status_of(exc)
        fields = {"code": code.name, "error_type": error_type, "duration_ms": _ms(start)}
        if sent is not None:
            fields["messages"] = sent
        if code is Code.INTERNAL:
            _log.error("rpc failed", exc_info=exc, **fields)
        else:
            _log.info("rpc refused", reason=message, **fields)
        status = _status(code, message, exc)
        await context.abort(
            status.code,
            status.details,
            trailing_metadata=(("x-error-type", error_type), *status.trailing_metadata),
        )
        raise AssertionError("context.abort returned")  # pragma: no cover


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
