"""What the TensorRT-LLM and SGLang client tests share: a router or a gateway over stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest

from tokenwire.proto.v1 import chat_pb2
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine
from tokenwire.testing.fake import FakeBackend
from tokenwire.testing.server import RunningServer, config_for_tests, running_server
from tokenwire.testing.standins.server import RunningStandin, running_standin


@contextlib.asynccontextmanager
async def routed_over(protocol: str) -> AsyncIterator[RoutedEngine]:
    """A started RoutedEngine over one ``protocol`` stand-in serving a paced fake engine."""
    fake = FakeBackend(token_delay_s=0.001, endless=True)
    async with running_standin(protocol, fake) as standin:
        engine = RoutedEngine(RouterConfig(workers=standin.target, poll_interval_s=0.02))
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()


@contextlib.asynccontextmanager
async def standin_gateway(
    protocol: str, *fakes: FakeBackend, standin: dict[str, Any] | None = None, **router: Any
) -> AsyncIterator[tuple[RunningServer, RoutedEngine, list[RunningStandin]]]:
    """A gateway routing over one ``protocol`` stand-in per fake engine."""
    async with contextlib.AsyncExitStack() as stack:
        standins = [
            await stack.enter_async_context(running_standin(protocol, f, **(standin or {})))
            for f in fakes
        ]
        workers = ",".join(s.target for s in standins)
        config = RouterConfig(workers=workers, poll_interval_s=0.02, **router)
        engine = RoutedEngine(config)
        running = await stack.enter_async_context(
            running_server(engine, config_for_tests(router=config))
        )
        yield running, engine, standins


async def failing_turn(running: RunningServer) -> tuple[grpc.StatusCode, str]:
    """A turn that fails: its status and the text that came before."""
    received: list[chat_pb2.CompleteResponse] = []

    async def consume() -> None:
        async for event in running.chat.Complete(chat_pb2.CompleteRequest(message="go")):
            received.append(event)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await consume()
    return raised.value.code(), text_of(received)


async def turn(running: RunningServer, message: str = "hi") -> list[chat_pb2.CompleteResponse]:
    """All events of one Complete turn."""
    return [e async for e in running.chat.Complete(chat_pb2.CompleteRequest(message=message))]


def text_of(events: Sequence[chat_pb2.CompleteResponse]) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def until(check: Callable[[], object], limit_s: float = 2.0) -> None:
    """Wait until ``check()`` is true (the router polls every 20 ms)."""
    for _ in range(int(limit_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
