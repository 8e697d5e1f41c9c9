"""Exact retries: a turn sent again with its idempotency key is that turn, never a second one."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tokenwire.auth.keys import make_principal
from tokenwire.config import LimitsConfig
from tokenwire.context import CallState
from tokenwire.live import MemoryLiveBus
from tokenwire.live.bus import LiveEvent
from tokenwire.model.frontend import frontend_for
from tokenwire.proto.v1 import chat_pb2
from tokenwire.proto.v1 import conversations_pb2 as cv
from tokenwire.services.convert import ResponseEvents
from tokenwire.stores import SQLiteConversationStore
from tokenwire.testing import FakeBackend, running_server
from tokenwire.turns.events import TurnRequest
from tokenwire.turns.policy import TurnInfo, TurnOutcome
from tokenwire.turns.runner import TurnRunner

from .conftest import REPLY, Device, Gateway

_EVENTS = ResponseEvents(chat_pb2.CompleteResponse)


def _answer(events: list[chat_pb2.CompleteResponse]) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def _messages(device: Device, conversation_id: str) -> list[tuple[str, str]]:
    page = await device.conversations.ListMessages(
        cv.ListMessagesRequest(conversation_id=conversation_id), metadata=device.metadata
    )
    return [(m.role, m.content) for m in page.messages]


async def test_a_retry_after_the_turn_ended_replays_it(gateway: Gateway) -> None:
    """Same key again: the same turn, answer and usage; nothing generated or stored twice."""
    alice = gateway.device("alice")
    first = await alice.complete("Tell me a fact", idempotency_key="k-1")
    again = await gateway.device("alice").complete("Tell me a fact", idempotency_key="k-1")
    assert first[0].started == again[0].started
    assert REPLY == _answer(first) == _answer(again)
    assert first[-1].finished.finish_reason == again[-1].finished.finish_reason
    assert first[-1].finished.usage.completion_tokens == again[-1].finished.usage.completion_tokens
    assert 1 == len(gateway.backend.requests)
    conversation_id = first[0].started.conversation_id
    assert [("user", "Tell me a fact"), ("assistant", REPLY)] == await _messages(
        alice, conversation_id
    )


async def test_a_key_belongs_to_its_user(gateway: Gateway) -> None:
    """Bob's turn with alice's key is a turn of his own."""
    alice, bob = gateway.device("alice"), gateway.device("bob")
    first = await alice.complete("hi", idempotency_key="shared")
    other = await bob.complete("hi", idempotency_key="shared")
    assert first[0].started.turn_id != other[0].started.turn_id
    assert 2 == len(gateway.backend.requests)


async def test_a_retry_while_running_attaches_to_the_turn(gateway: Gateway) -> None:
    """A retry sent mid-answer gets the text sent so far, then the rest live: the whole
    answer exactly once, from one generation."""
    phone, laptop = gateway.device("alice"), gateway.device("alice")
    call = phone.chat.Complete(
        chat_pb2.CompleteRequest(message="long one", idempotency_key="k-run"),
        metadata=phone.metadata,
    )
    events = [await anext(aiter(call)) for _ in range(6)]  # TurnStarted and five deltas
    retried = await laptop.complete("long one", idempotency_key="k-run")
    events += [event async for event in call]
    assert events[0].started == retried[0].started
    assert REPLY == _answer(events) == _answer(retried)
    assert chat_pb2.FINISH_REASON_STOP == retried[-1].finished.finish_reason
    assert 1 == len(gateway.backend.requests)


async def test_a_client_that_drops_resumes_with_its_key(gateway: Gateway) -> None:
    """The call is cut mid-answer; the keyed turn goes on, and the resumed call gets the
    whole answer once; the store holds it once, complete."""
    phone = gateway.device("alice")
    call = phone.chat.Complete(
        chat_pb2.CompleteRequest(message="story", idempotency_key="k-drop"),
        metadata=phone.metadata,
    )
    started = await anext(aiter(call))
    await anext(aiter(call))
    call.cancel()  # the network dropped
    await asyncio.sleep(0.02)
    resumed = await gateway.device("alice").complete("story", idempotency_key="k-drop")
    assert started.started == resumed[0].started
    assert REPLY == _answer(resumed)
    assert chat_pb2.FINISH_REASON_STOP == resumed[-1].finished.finish_reason
    assert [("user", "story"), ("assistant", REPLY)] == await _messages(
        phone, started.started.conversation_id
    )
    assert 1 == len(gateway.backend.requests)


async def test_a_turn_without_a_key_stops_with_its_call(gateway: Gateway) -> None:
    """No key: the client leaving cancels the answer, stored incomplete as sent."""
    phone = gateway.device("alice")
    call = phone.chat.Complete(chat_pb2.CompleteRequest(message="story"), metadata=phone.metadata)
    started = await anext(aiter(call))
    await anext(aiter(call))
    call.cancel()
    conversation_id = started.started.conversation_id
    for _ in range(200):
        page = await phone.conversations.ListMessages(
            cv.ListMessagesRequest(conversation_id=conversation_id), metadata=phone.metadata
        )
        if len(page.messages) == 2:
            break
        await asyncio.sleep(0.01)
    answer = page.messages[1]
    assert ("assistant", False) == (answer.role, answer.complete)
    assert REPLY.startswith(answer.content)
    assert len(answer.content) < len(REPLY)


class _SlowBeginStore(SQLiteConversationStore):
    """Commits a turn's first write, then answers late: a cancel lands while it is in flight."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.begun = asyncio.Event()

    async def begin_turn(self, owner: str, conversation_id: str, **fields: Any) -> Any:
        begun = await super().begin_turn(owner, conversation_id, **fields)
        self.begun.set()
        await asyncio.sleep(0.3)
        return begun


async def test_a_cancel_during_the_first_write_leaves_no_orphan() -> None:
    """The client leaves while its new conversation is being stored: the write is undone,
    no conversation or message is left, and nothing was generated."""
    store = _SlowBeginStore()
    backend = FakeBackend(reply="never")
    async with running_server(backend, store=store) as running:
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="hello"))
        reading = asyncio.ensure_future(call.initial_metadata())
        await asyncio.wait_for(store.begun.wait(), 10)
        call.cancel()
        reading.cancel()
        for _ in range(100):
            page = await store.list_conversations("default/anonymous", page_size=10)
            if not page.items:
                break
            await asyncio.sleep(0.02)
        assert [] == page.items
        assert 0 == len(backend.requests)


async def test_a_converse_turn_with_a_key_outlives_its_stream(gateway: Gateway) -> None:
    """The Converse stream breaks mid-answer; the keyed turn goes on and a Complete with
    its key gets the whole answer, once."""
    phone = gateway.device("alice")
    stream = phone.chat.Converse(metadata=phone.metadata)
    await stream.write(
        chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message="tale", idempotency_key="k-c"))
    )
    started = await stream.read()
    await stream.read()  # a first delta
    stream.cancel()
    resumed = await gateway.device("alice").complete("tale", idempotency_key="k-c")
    assert started.started == resumed[0].started
    assert REPLY == _answer(resumed)
    assert 1 == len(gateway.backend.requests)


async def test_a_turn_closed_at_turn_started_frees_its_conversation() -> None:
    """The client goes while TurnStarted is on its way: the turn is stored as cancelled,
    and the conversation takes the next turn at once."""
    store = SQLiteConversationStore(":memory:")
    await store.open()
    model = frontend_for(FakeBackend(reply="hello"), LimitsConfig())
    await model.start()
    runner = TurnRunner({model.name: model}, store, LimitsConfig(), [])
    call = CallState("r-1", "/test", principal=make_principal("acme", "alice"))
    try:
        first = runner.run(TurnRequest("hi"), call, _EVENTS)
        started = (await anext(first)).started
        await first.aclose()
        turn = await store.get_turn("acme/alice", started.turn_id)
        assert (False, "cancelled") == (turn.running, turn.finish_reason)
        second = runner.run(
            TurnRequest("again", conversation_id=started.conversation_id), call, _EVENTS
        )
        kinds = [event.WhichOneof("event") async for event in second]
        assert "finished" == kinds[-1]
    finally:
        await model.close()
        await store.close()


async def test_stop_on_a_resumed_turn_stops_the_turn_itself(gateway: Gateway) -> None:
    """A phone resumes a keyed turn on a new stream and presses stop: the original turn
    stops too (the engine is free), and the conversation takes the next turn."""
    phone = gateway.device("alice")
    start = chat_pb2.ConverseRequest(
        start=chat_pb2.StartTurn(message="long", idempotency_key="k-stop")
    )
    first = phone.chat.Converse(metadata=phone.metadata)
    await first.write(start)
    conversation_id = (await first.read()).started.conversation_id
    first.cancel()
    second = phone.chat.Converse(metadata=phone.metadata)
    await second.write(start)
    assert "started" == (await second.read()).WhichOneof("event")
    await second.write(chat_pb2.ConverseRequest(cancel=chat_pb2.CancelTurn()))
    while (response := await second.read()).WhichOneof("event") != "finished":
        pass
    assert chat_pb2.FINISH_REASON_CANCELLED == response.finished.finish_reason
    await second.write(
        chat_pb2.ConverseRequest(
            start=chat_pb2.StartTurn(message="next", conversation_id=conversation_id)
        )
    )
    assert "started" == (await second.read()).WhichOneof("event")
    second.cancel()


class _DroppingBus(MemoryLiveBus):
    """Loses the third delta of every turn, as a bus that failed a write would."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas: dict[str, int] = {}

    def publish(self, conversation_id: str, event: LiveEvent) -> None:
        if event.kind == "delta":
            self.deltas[event.turn_id] = self.deltas.get(event.turn_id, 0) + 1
            if self.deltas[event.turn_id] == 3:
                return
        super().publish(conversation_id, event)


async def test_a_retry_attached_over_a_lossy_bus_still_gets_the_whole_answer() -> None:
    """A delta lost on the bus is noticed (its successor starts later in the answer):
    the rest of the answer comes from the store, exactly once."""
    backend = FakeBackend(reply=REPLY, token_delay_s=0.005)
    async with running_server(backend, live=_DroppingBus()) as running:
        request = chat_pb2.CompleteRequest(message="long one", idempotency_key="k-lossy")
        first = running.chat.Complete(request)
        await anext(aiter(first))
        retried = [event async for event in running.chat.Complete(request)]
        first.cancel()
    assert REPLY == _answer(retried)
    assert 1 == len(backend.requests)


class _Outcomes:
    """A turn policy that records how each turn settled."""

    def __init__(self) -> None:
        self.outcomes: list[TurnOutcome] = []

    async def before_turn(self, turn: TurnInfo) -> None:
        return None

    def output_filter(self, turn: TurnInfo) -> None:
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        self.outcomes.append(outcome)


async def test_refused_and_replayed_turns_settle_no_tokens() -> None:
    """A turn refused because the conversation is busy, and a retry that replays a turn,
    settle with zero tokens: only the turn that ran is charged."""
    recorder = _Outcomes()
    backend = FakeBackend(reply=REPLY, token_delay_s=0.005)
    async with running_server(backend, policies=[recorder]) as running:
        first = [e async for e in running.chat.Complete(chat_pb2.CompleteRequest(message="a"))]
        conversation_id = first[0].started.conversation_id
        request = chat_pb2.CompleteRequest(
            message="b", conversation_id=conversation_id, idempotency_key="k-q"
        )
        racing = running.chat.Complete(request)
        await anext(aiter(racing))
        busy = running.chat.Complete(
            chat_pb2.CompleteRequest(message="c", conversation_id=conversation_id)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anext(aiter(busy))
        assert grpc.StatusCode.ABORTED == refused.value.code()
        replayed = [e async for e in running.chat.Complete(request)]
        [e async for e in racing]
    assert REPLY == _answer(replayed)
    charged = sorted(o.prompt_tokens + o.completion_tokens for o in recorder.outcomes)
    assert 4 == len(charged)
    assert [0, 0] == charged[:2]
    assert all(tokens > 0 for tokens in charged[2:])
