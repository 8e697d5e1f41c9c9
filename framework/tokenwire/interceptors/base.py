"""The interceptor framework: one ``intercept`` method for all four RPC shapes.

An interceptor receives the next step of the chain (``proceed``), the request
(or the request stream), the servicer context and a :class:`CallInfo`.
``await proceed(request, context)`` returns the response for unary-response
calls and an async iterator of responses for streaming ones, so one method
serves every shape:

    class TimingInterceptor(Interceptor):
        async def intercept(self, proceed, request, context, call):
            start = time.perf_counter()
            result = await proceed(request, context)
            if not call.response_streaming:
                log.info("took", s=time.perf_counter() - start)
                return result
            return self._timed(result, start)       # wrap the stream, see every message

An interceptor that does not care about the response stream returns it as is and
costs nothing per message. All interceptors run inside one grpc.aio server
interceptor (:class:`InterceptorChain`), in the order given, outermost first.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import grpc

from tokenwire.errors import InvalidArgumentError
from tokenwire.streams import closing

__all__ = ["CallInfo", "Interceptor", "InterceptorChain", "Proceed", "UndecodableRequest"]

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # the runtime class is not generic
    _ServerInterceptor = grpc.aio.ServerInterceptor

Proceed = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """Stands in for a request message that did not parse (say, invalid UTF-8 in a string).

    A unary request like this is refused with INVALID_ARGUMENT before the handler
    runs; in a request stream it reaches the handler, which reports it and goes on
    with the next message.
    """

    message: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # google.protobuf.message.DecodeError, whatever the runtime
            return UndecodableRequest(
                "the request could not be decoded: it is not a valid message of this "
                "method's request type (string fields must hold valid UTF-8)"
            )

    return deserialize


@dataclass(frozen=True, slots=True)
class CallInfo:
    """The static facts of an RPC, known before its handler runs."""

    method: str  # "/tokenwire.v1.ChatService/Complete"
    request_streaming: bool
    response_streaming: bool

    @property
    def service(self) -> str:
        """The fully qualified service name, e.g. ``tokenwire.v1.ChatService``."""
        return self.method.rsplit("/", 2)[-2] if self.method.count("/") >= 2 else ""

    @property
    def name(self) -> str:
        """The bare method name, e.g. ``Complete``."""
        return self.method.rsplit("/", 1)[-1]


class Interceptor(abc.ABC):
    """A step around every RPC. Subclasses implement :meth:`intercept`.

    ``start`` and ``close`` (optional) open and release what the interceptor
    needs (a key store, a Redis connection, a model); the server calls them.
    An interceptor that names the caller (sets ``current_call().principal``
    on every call it admits) says so with ``authenticates = True``: a server
    refuses a chain without one.
    """

    authenticates: ClassVar[bool] = False

    async def start(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Open resources before the server accepts calls."""

    async def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release resources after the server has drained."""

    @abc.abstractmethod
    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        """Run around one call; return ``await proceed(request, context)`` or a wrapper of it.

        ``request`` is the request message, or an async iterator of them when
        ``call.request_streaming``; the result is the response message, or an
        async iterator of them when ``call.response_streaming``.
        """


def _bind(interceptor: Interceptor, proceed: Proceed, call: CallInfo) -> Proceed:
    async def step(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await interceptor.intercept(proceed, request, context, call)

    return step


class InterceptorChain(_ServerInterceptor):
    """Adapts a list of :class:`Interceptor` (outermost first) to grpc.aio."""

    def __init__(self, interceptors: Sequence[Interceptor]) -> None:
        self._interceptors = tuple(interceptors)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or not self._interceptors:
            return handler
        call = CallInfo(
            method=handler_call_details.method,
            request_streaming=handler.request_streaming,
            response_streaming=handler.response_streaming,
        )
        if handler.request_streaming and handler.response_streaming:
            inner: Any = handler.stream_stream
            factory: Any = grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            inner, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            inner, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            inner, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler

        async def innermost(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgumentError(request.message)
            result = inner(request, context)
            # Unary-response handlers are coroutines; streaming ones return async iterators.
            return result if call.response_streaming else await result

        proceed: Proceed = innermost
        for interceptor in reversed(self._interceptors):
            proceed = _bind(interceptor, proceed, call)
        chain = proceed

        if call.response_streaming:

            async def stream_behavior(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                responses = await chain(request, context)
                # Closed explicitly: a cancel while grpc sends must stop the producers now.
                async with closing(responses):
                    async for response in responses:
                        yield response

            behavior: Callable[..., Any] = stream_behavior
        else:
            behavior = chain
        wrapped: grpc.RpcMethodHandler[Any, Any] = factory(
            behavior,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        return wrapped
