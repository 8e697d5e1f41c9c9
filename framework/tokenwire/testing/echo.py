"""A dummy service with all four RPC shapes, served for real, to test interceptors.

async with running_echo_server([MyInterceptor()]) as echo:
    assert "hi" == (await echo.stub.Unary(EchoRequest(text="hi"))).text
    assert 1 == echo.servicer.calls        # the handler ran
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from tokenwire.errors import InternalError
from tokenwire.interceptors.base import Interceptor, InterceptorChain
from tokenwire.proto.testing.v1 import echo_pb2, echo_pb2_grpc

if TYPE_CHECKING:
    from tokenwire.proto.testing.v1.echo_pb2_grpc import EchoServiceAsyncStub

__all__ = ["EchoServer", "EchoServicer", "echo_pb2", "echo_pb2_grpc", "running_echo_server"]

Context = grpc.aio.ServicerContext[Any, Any]


def _check_failure(request: echo_pb2.EchoRequest, sent: int) -> None:
    if request.fail_after and sent >= request.fail_after:
        raise InternalError("injected echo failure")


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """Echoes; ``calls`` counts handler invocations, ``active`` the ones still running."""

    def __init__(self) -> None:
        self.calls = 0
        self.active = 0

    async def Unary(self, request: echo_pb2.EchoRequest, context: Context) -> echo_pb2.EchoResponse:
        self.calls += 1
        _check_failure(request, 1)
        return echo_pb2.EchoResponse(text=request.text)

    async def ServerStream(
        self, request: echo_pb2.EchoRequest, context: Context
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        self.calls += 1
        self.active += 1
        try:
            for index in range(request.count):
                _check_failure(request, index)
                yield echo_pb2.EchoResponse(text=request.text, index=index)
        finally:
            self.active -= 1

    async def ClientStream(
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: Context
    ) -> echo_pb2.EchoResponse:
        self.calls += 1
        texts = [request.text async for request in request_iterator]
        return echo_pb2.EchoResponse(text=" ".join(texts), index=len(texts))

    async def Bidi(
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: Context
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        self.calls += 1
        self.active += 1
        try:
            index = 0
            async for request in request_iterator:
                _check_failure(request, index)
                yield echo_pb2.EchoResponse(text=request.text, index=index)
                index += 1
        finally:
            self.active -= 1


@dataclass(slots=True)
class EchoServer:
    """A running echo server: its servicer, a channel and a typed stub."""

    servicer: EchoServicer
    channel: grpc.aio.Channel
    stub: EchoServiceAsyncStub
    address: str


@asynccontextmanager
async def running_echo_server(
    interceptors: Sequence[Interceptor] = (),
) -> AsyncIterator[EchoServer]:
    """Serve :class:`EchoServicer` behind ``interceptors`` on 127.0.0.1:0."""
    server = grpc.aio.server(interceptors=[InterceptorChain(interceptors)])
    servicer = EchoServicer()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield EchoServer(servicer, channel, echo_pb2_grpc.EchoServiceStub(channel), address)
    finally:
        await channel.close(None)
        await server.stop(0)
