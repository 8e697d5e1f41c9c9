"""Turn cleanup under cancellation: order, completeness, and the reported finish reason."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Iterator

import grpc
import pytest

from tests.conftest import wait_until
from tests.test_chat_service import next_event, start
from tokenwire.proto.v1 import chat_pb2
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import FakeBackend, config_for_tests, running_server
from tokenwire.turns.policy import OutputFilter, TurnInfo, TurnOutcome


class RecordingHook:
    """A turn policy that records its settlement, optionally slowly."""

    def __init__(self, name: str, log: list[tuple[str, ...]], fake: FakeBackend, delay: float):
        self.name, self.log, self.fake, self.delay = name, log, fake, delay

    async def before_turn(self, turn: TurnInfo) -> None:
        return None

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        await asyncio.sleep(self.delay)
        self.log.append((self.name, outcome.finish_reason.value, f"engine={self.fake.running}"))


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Garbage collection off: cleanup must not depend on abandoned generators being collected."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_gc")
async def test_a_client_gone_while_the_server_writes_stops_and_saves_before_settling() -> None:
    """Cancel while grpc is blocked sending: the engine stops, the answer is saved, then hooks."""
    log: list[tuple[str, ...]] = []
    fake = FakeBackend(reply="x", endless=True, tokens_per_chunk=4000, context_length=10**7)
    store = SQLiteConversationStore(":memory:")
    hook = RecordingHook("hook", log, fake, 0.0)
    async with running_server(fake, store=store, policies=[hook]) as running:
        request = chat_pb2.CompleteRequest(
            message="go", params=chat_pb2.SamplingParams(max_tokens=5_000_000)
        )
        call = running.chat.Complete(request)
        conversation = (await call.read()).started.conversation_id
        await asyncio.sleep(0.3)  # the client reads nothing more: the server blocks in send
        call.cancel()
        await wait_until(lambda: bool(log), limit_s=5)
        messages = await store.list_messages("default/anonymous", conversation)
    assert [("hook", "cancelled", "engine=0")] == log
    assert ["user", "assistant"] == [m.role for m in messages]
    assert not messages[1].complete


async def test_a_cancel_during_settlement_still_settles_every_hook() -> None:
    """A deadline that fires while one hook settles does not skip the hooks after it."""
    log: list[tuple[str, ...]] = []
    fake = FakeBackend(reply="ab")
    outer = RecordingHook("outer", log, fake, 0.0)
    inner = RecordingHook("inner", log, fake, 0.5)
    async with running_server(fake, policies=[outer, inner]) as running:
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="go"), timeout=0.25)
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [event async for event in call]
        await wait_until(lambda: len(log) == 2, limit_s=5)
    assert ["inner", "outer"] == [name for name, *_ in log]


async def test_cancel_after_the_answer_ended_reports_how_it_ended() -> None:
    """A CancelTurn that arrives while a finished turn settles changes nothing."""
    log: list[tuple[str, ...]] = []
    fake = FakeBackend(reply="hello")
    store = SQLiteConversationStore(":memory:")
    hook = RecordingHook("slow", log, fake, 0.3)
    async with running_server(fake, store=store, policies=[hook]) as running:
        call = running.chat.Converse()
        await call.write(start("go"))
        started = (await next_event(call, "started")).started
        await wait_until(lambda: fake.running == 0 and bool(fake.requests))
        await call.write(chat_pb2.ConverseRequest(cancel=chat_pb2.CancelTurn()))
        finished = (await next_event(call, "finished")).finished
        await call.done_writing()
        messages = await store.list_messages("default/anonymous", started.conversation_id)
    assert chat_pb2.FINISH_REASON_STOP == finished.finish_reason
    assert ("hello", True) == (messages[-1].content, messages[-1].complete)
    assert [("slow", "stop", "engine=0")] == log


async def test_a_converse_stream_opened_while_draining_is_refused() -> None:
    """During the drain delay a new Converse stream ends at once with UNAVAILABLE."""
    config = config_for_tests()
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, drain_delay_s=1.0)
    )
    async with running_server(FakeBackend(), config) as running:
        stopping = asyncio.create_task(running.server.stop(grace=5))
        await wait_until(lambda: running.server._chat is not None and running.server._chat.draining)
        call = running.chat.Converse()
        assert grpc.StatusCode.UNAVAILABLE == await asyncio.wait_for(call.code(), 2)
        await stopping
