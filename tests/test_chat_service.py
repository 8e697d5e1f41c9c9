"""ChatService over a real in-process server with the fake engine."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import wait_until
from tokenwire.model.tokenizers import ByteTokenizer
from tokenwire.proto.v1 import chat_pb2
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

Events = list[chat_pb2.CompleteResponse]


async def complete(running: RunningServer, message: str = "Hi", **fields: object) -> Events:
    """All events of one Complete call."""
    request = chat_pb2.CompleteRequest(message=message, **fields)
    return [event async for event in running.chat.Complete(request)]


def text_of(events: Events | list[chat_pb2.ConverseResponse]) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def next_event(call: grpc.aio.StreamStreamCall, kind: str) -> chat_pb2.ConverseResponse:
    """Read a Converse stream until an event of ``kind`` arrives."""
    while True:
        event = await asyncio.wait_for(call.read(), 10)
        assert event is not grpc.aio.EOF, f"stream ended before a {kind} event"
        if event.WhichOneof("event") == kind:
            return event


def start(message: str, **fields: object) -> chat_pb2.ConverseRequest:
    return chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message=message, **fields))


async def test_complete_streams_started_deltas_then_finished(served: RunningServer) -> None:
    """A turn is TurnStarted, one Delta per engine chunk, then TurnFinished with usage."""
    events = await complete(served)
    kinds = [e.WhichOneof("event") for e in events]
    assert ["started", *["delta"] * (len(events) - 2), "finished"] == kinds
    assert text_of(events) == "Hello, world!"
    finished = events[-1].finished
    assert finished.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert sum(e.delta.token_count for e in events[1:-1]) == finished.usage.completion_tokens
    # The byte tokenizer's template, "<|user|>Hi\n<|assistant|>": 24 bytes, 24 tokens.
    assert 24 == finished.usage.prompt_tokens
    assert events[0].started.conversation_id.startswith("conv_")
    assert events[0].started.model == "fake"


async def test_max_tokens_ends_with_length(served: RunningServer) -> None:
    """max_tokens bounds the answer and the turn finishes with LENGTH."""
    events = await complete(served, params=chat_pb2.SamplingParams(max_tokens=5))
    assert text_of(events) == "Hello"
    assert events[-1].finished.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert events[-1].finished.usage.completion_tokens == 5


async def test_stop_string_cuts_the_answer_across_chunks(served: RunningServer) -> None:
    """A stop string split over several tokens ends the turn before it, with STOP."""
    events = await complete(served, params=chat_pb2.SamplingParams(stop=["wor"]))
    assert text_of(events) == "Hello, "
    assert events[-1].finished.finish_reason == chat_pb2.FINISH_REASON_STOP


async def test_deltas_never_split_a_utf8_character() -> None:
    """Multi-byte characters spread over byte tokens arrive whole, never split."""
    reply = "naïve café 世界 🎉 done"
    async with running_server(FakeBackend(reply=reply)) as running:
        events = await complete(running)
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert reply == "".join(d.text for d in deltas)
    assert all("\ufffd" not in d.text for d in deltas)
    assert len(reply.encode()) == sum(d.token_count for d in deltas)
    assert any(d.token_count > 1 for d in deltas)  # 🎉 is four byte tokens in one delta


async def test_converse_runs_two_turns_on_one_stream(
    served: RunningServer, fake: FakeBackend
) -> None:
    """Two turns on one stream; the second continues the first's conversation and history."""
    call = served.chat.Converse()
    await call.write(start("first question"))
    started = (await next_event(call, "started")).started
    await next_event(call, "finished")
    await call.write(start("second question", conversation_id=started.conversation_id))
    second = (await next_event(call, "started")).started
    await next_event(call, "finished")
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    assert started.conversation_id == second.conversation_id
    assert started.turn_id != second.turn_id
    prompt = bytes(fake.requests[1].request.prompt_token_ids).decode()
    assert "first question" in prompt
    assert "Hello, world!" in prompt  # the first answer is history
    assert prompt.index("first question") < prompt.index("second question")


async def test_time_to_first_token_is_measured_from_the_request() -> None:
    """An engine that takes 50 ms a token reports a first token after at least 50 ms."""
    async with running_server(FakeBackend(reply="ab", token_delay_s=0.05)) as running:
        events = await complete(running)
    ttft = events[-1].finished.usage.time_to_first_token_ms
    assert 50 <= ttft < 2000


async def test_cancel_turn_stops_the_backend() -> None:
    """CancelTurn ends the turn with CANCELLED and the engine stops generating."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.01)
    async with running_server(fake) as running:
        call = running.chat.Converse()
        await call.write(start("go"))
        turn_id = (await next_event(call, "started")).started.turn_id
        delivered = (await next_event(call, "delta")).delta.token_count
        await call.write(chat_pb2.ConverseRequest(cancel=chat_pb2.CancelTurn(turn_id=turn_id)))
        while (event := await asyncio.wait_for(call.read(), 10)).WhichOneof("event") == "delta":
            delivered += event.delta.token_count
        finished = event.finished
        assert finished.finish_reason == chat_pb2.FINISH_REASON_CANCELLED
        assert delivered >= 1
        assert delivered == finished.usage.completion_tokens  # the tokens the client got
        await wait_until(lambda: fake.running == 0)
        steps = fake.steps_executed
        await asyncio.sleep(0.1)
        assert steps == fake.steps_executed
        assert fake.requests[0].closed
        # The stream stays usable for another turn.
        await call.write(start("again", params=chat_pb2.SamplingParams(max_tokens=3)))
        assert (
            await next_event(call, "finished")
        ).finished.finish_reason == chat_pb2.FINISH_REASON_LENGTH
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


async def test_client_cancel_stops_the_backend() -> None:
    """A client that cancels a Complete call stops the engine's work for it."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.01)
    async with running_server(fake) as running:
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="go"))
        async for event in call:
            if event.HasField("delta"):
                break
        call.cancel()
        await wait_until(lambda: fake.running == 0)
        assert fake.requests[0].closed
        steps = fake.steps_executed
        await asyncio.sleep(0.1)
        assert steps == fake.steps_executed


async def test_converse_disconnect_stops_the_backend() -> None:
    """Cancelling a Converse stream mid-turn stops the engine's work for it."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.01)
    async with running_server(fake) as running:
        call = running.chat.Converse()
        await call.write(start("go"))
        await next_event(call, "delta")
        call.cancel()
        await wait_until(lambda: fake.running == 0)
        assert fake.requests[0].closed


async def test_deadline_exceeded_stops_the_backend() -> None:
    """A call past its deadline fails with DEADLINE_EXCEEDED and the engine stops."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.01)
    async with running_server(fake) as running:
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="go"), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: fake.running == 0)
        assert fake.requests[0].closed


async def test_cancelled_turn_stores_exactly_the_text_sent() -> None:
    """After a cancel, the stored assistant message equals the text the client received."""
    fake = FakeBackend(reply="abcdef", endless=True, token_delay_s=0.005)
    store = SQLiteConversationStore(":memory:")
    async with running_server(fake, store=store) as running:
        call = running.chat.Converse()
        await call.write(start("go"))
        started = (await next_event(call, "started")).started
        received = ""
        while len(received) < 5:
            received += (await next_event(call, "delta")).delta.text
        await call.write(chat_pb2.ConverseRequest(cancel=chat_pb2.CancelTurn()))
        while (event := await call.read()).WhichOneof("event") != "finished":
            received += event.delta.text
        await call.done_writing()
        messages = await store.list_messages("default/anonymous", started.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert received == messages[1].content
    assert not messages[1].complete


async def test_second_start_while_a_turn_runs_is_refused() -> None:
    """StartTurn during a running turn gets FAILED_PRECONDITION; the running turn goes on."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.01)
    async with running_server(fake) as running:
        call = running.chat.Converse()
        await call.write(start("one", params=chat_pb2.SamplingParams(max_tokens=20)))
        await next_event(call, "delta")
        await call.write(start("two"))
        error = (await next_event(call, "error")).error
        assert grpc.StatusCode.FAILED_PRECONDITION.value[0] == error.code
        finished = (await next_event(call, "finished")).finished
        assert finished.finish_reason == chat_pb2.FINISH_REASON_LENGTH
        await call.done_writing()


def _limits_config() -> object:
    config = config_for_tests()
    return dataclasses.replace(
        config, limits=dataclasses.replace(config.limits, max_message_chars=100)
    )


INVALID = {
    "empty message": {"message": "  "},
    "message too long": {"message": "x" * 101},
    "negative temperature": {"params": chat_pb2.SamplingParams(temperature=-0.5)},
    "temperature too high": {"params": chat_pb2.SamplingParams(temperature=2.5)},
    "temperature NaN": {"params": chat_pb2.SamplingParams(temperature=float("nan"))},
    "top_p above one": {"params": chat_pb2.SamplingParams(top_p=1.5)},
    "negative top_k": {"params": chat_pb2.SamplingParams(top_k=-1)},
    "negative max_tokens": {"params": chat_pb2.SamplingParams(max_tokens=-1)},
    "max_tokens past the context": {"params": chat_pb2.SamplingParams(max_tokens=4096)},
    "too many stop strings": {"params": chat_pb2.SamplingParams(stop=["a"] * 9)},
    "stop string too long": {"params": chat_pb2.SamplingParams(stop=["s" * 300])},
    "empty stop string": {"params": chat_pb2.SamplingParams(stop=[""])},
    "idempotency key too long": {"idempotency_key": "k" * 200},
}


@pytest.mark.parametrize("fields", INVALID.values(), ids=INVALID.keys())
async def test_invalid_input_is_invalid_argument(fields: dict[str, object]) -> None:
    """Each bad field is refused with INVALID_ARGUMENT and a message, before the engine runs."""
    fake = FakeBackend(context_length=4096)
    request = {"message": "Hi", **fields}
    async with running_server(fake, _limits_config()) as running:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await complete(running, **request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details()
    assert "Traceback" not in raised.value.details()
    assert fake.requests == []


async def test_prompt_longer_than_the_context_is_invalid_argument() -> None:
    """A prompt that does not fit the model's context is INVALID_ARGUMENT naming both sizes."""
    fake = FakeBackend(context_length=64)
    async with running_server(fake) as running:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await complete(running, message="y" * 80)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "64" in raised.value.details()
    assert fake.requests == []


async def test_oversized_message_is_refused_by_the_transport() -> None:
    """A request bigger than server.max_receive_message_bytes never reaches the handler."""
    config = config_for_tests()
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, max_receive_message_bytes=1024)
    )
    fake = FakeBackend()
    async with running_server(fake, config) as running:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await complete(running, message="z" * 4096)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fake.requests == []


async def test_unknown_model_and_conversation_are_not_found(served: RunningServer) -> None:
    """A model or conversation that does not exist is NOT_FOUND."""
    for fields in ({"model": "gpt-nine"}, {"conversation_id": "conv_" + "0" * 32}):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await complete(served, **fields)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_converse_reports_errors_and_stays_open(served: RunningServer) -> None:
    """A bad turn on Converse yields a TurnError; the next turn on the stream works."""
    call = served.chat.Converse()
    await call.write(start(""))
    error = (await next_event(call, "error")).error
    assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == error.code
    assert error.error_type == "invalid_argument"
    await call.write(start("Hi"))
    assert (
        await next_event(call, "finished")
    ).finished.finish_reason == chat_pb2.FINISH_REASON_STOP
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_backend_failure_is_internal_without_details() -> None:
    """An engine failure mid-stream ends Complete with INTERNAL and no internals leaked."""
    fake = FakeBackend(reply="abcdefgh", fail_after=3)
    store = SQLiteConversationStore(":memory:")
    async with running_server(fake, store=store) as running:
        received: list[chat_pb2.CompleteResponse] = []

        async def consume() -> None:
            async for event in running.chat.Complete(chat_pb2.CompleteRequest(message="go")):
                received.append(event)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await consume()
        conversation = received[0].started.conversation_id
        messages = await store.list_messages("default/anonymous", conversation)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "injected" not in raised.value.details()
    assert text_of(received) == "abc"
    assert messages[-1].content == "abc"
    assert not messages[-1].complete


async def test_backend_failure_on_converse_is_a_turn_error() -> None:
    """An engine failure on Converse is a TurnError with INTERNAL; the stream survives."""
    fake = FakeBackend(reply="abcdefgh", fail_after=2)
    async with running_server(fake) as running:
        call = running.chat.Converse()
        await call.write(start("go"))
        error = (await next_event(call, "error")).error
        assert grpc.StatusCode.INTERNAL.value[0] == error.code
        assert "injected" not in error.message
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


async def test_overloaded_backend_is_resource_exhausted_with_retry_info() -> None:
    """A backend at capacity refuses fast with RESOURCE_EXHAUSTED and a RetryInfo delay."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.01, max_running=1)
    async with running_server(fake) as running:
        busy = running.chat.Complete(chat_pb2.CompleteRequest(message="one"))
        await anext(aiter(busy))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await complete(running, message="two")
        busy.cancel()
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = dict(raised.value.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert retry.retry_delay.seconds == 1


async def test_byte_tokenizer_roundtrip() -> None:
    """The fake engine's tokenizer maps text to UTF-8 bytes and back."""
    tokenizer = ByteTokenizer()
    step = tokenizer.detokenizer().step
    assert "".join(step(t) for t in tokenizer.encode("é!")) == "é!"
