"""The interceptor chain on all four RPC shapes, against the shipped echo service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tokenwire.context import current_call
from tokenwire.errors import PermissionDeniedError
from tokenwire.interceptors import CallInfo, ErrorsInterceptor, Interceptor, Proceed
from tokenwire.testing.echo import echo_pb2, running_echo_server

Request = echo_pb2.EchoRequest
Context = grpc.aio.ServicerContext[Any, Any]


async def requests(*texts: str, fail_after: int = 0) -> AsyncIterator[echo_pb2.EchoRequest]:
    for text in texts:
        yield Request(text=text, fail_after=fail_after)


class RecordingInterceptor(Interceptor):
    """Records what it sees: the call, each request and each response."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.request_ids: list[str] = []

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        self.seen.append(call.name)
        self.request_ids.append(current_call().request_id)
        if call.request_streaming:
            request = self._requests(request)
        result = await proceed(request, context)
        if call.response_streaming:
            return self._responses(result)
        self.seen.append(f"response:{result.text}")
        return result

    async def _requests(self, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for item in stream:
            self.seen.append(f"request:{item.text}")
            yield item

    async def _responses(self, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for item in stream:
            self.seen.append(f"response:{item.text}")
            yield item


class DenyInterceptor(Interceptor):
    """Refuses every call before the handler runs."""

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        raise PermissionDeniedError(f"{call.name} is not allowed")


async def test_interceptors_see_every_message_of_every_shape() -> None:
    """One intercept method sees requests and responses of all four RPC shapes."""
    recorder = RecordingInterceptor()
    async with running_echo_server([ErrorsInterceptor(), recorder]) as echo:
        await echo.stub.Unary(Request(text="u"))
        _ = [r async for r in echo.stub.ServerStream(Request(text="s", count=2))]
        await echo.stub.ClientStream(requests("c1", "c2"))
        _ = [r async for r in echo.stub.Bidi(requests("b1", "b2"))]
    assert [
        "Unary", "response:u",
        "ServerStream", "response:s", "response:s",
        "ClientStream", "request:c1", "request:c2", "response:c1 c2",
        "Bidi", "request:b1", "response:b1", "request:b2", "response:b2",
    ] == recorder.seen  # fmt: skip
    assert all(len(rid) == 32 for rid in recorder.request_ids)
    assert 4 == len(set(recorder.request_ids))


@pytest.mark.parametrize("shape", ["Unary", "ServerStream", "ClientStream", "Bidi"])
async def test_a_refusal_maps_to_its_status_before_the_handler(shape: str) -> None:
    """An interceptor's error becomes its status code on every shape; the handler never runs."""
    async with running_echo_server([ErrorsInterceptor(), DenyInterceptor()]) as echo:
        request = Request(text="x", count=2)
        # Client-streaming calls are opened without writing: the refusal races any write.
        call: Any = {
            "Unary": lambda: echo.stub.Unary(request),
            "ServerStream": lambda: echo.stub.ServerStream(request),
            "ClientStream": lambda: echo.stub.ClientStream(),
            "Bidi": lambda: echo.stub.Bidi(),
        }[shape]()
        assert grpc.StatusCode.PERMISSION_DENIED == await call.code()
        assert f"{shape} is not allowed" == await call.details()
        assert 0 == echo.servicer.calls


@pytest.mark.parametrize("shape", ["Unary", "ServerStream", "Bidi"])
async def test_an_error_mid_stream_still_ends_with_a_status(shape: str) -> None:
    """A handler failing after some responses ends the call INTERNAL, with no internals."""
    async with running_echo_server([ErrorsInterceptor()]) as echo:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _call(echo.stub, shape, Request(text="x", count=5, fail_after=1))
        assert grpc.StatusCode.INTERNAL == raised.value.code()
        assert "injected" not in (raised.value.details() or "")


async def _call(stub: Any, shape: str, request: echo_pb2.EchoRequest) -> list[Any]:
    if shape == "Unary":
        return [await stub.Unary(request)]
    if shape == "ServerStream":
        return [r async for r in stub.ServerStream(request)]

    async def stream() -> AsyncIterator[echo_pb2.EchoRequest]:
        for _ in range(3):
            yield request

    if shape == "ClientStream":
        return [await stub.ClientStream(stream())]
    return [r async for r in stub.Bidi(stream())]
