"""The turn pipeline: atomic admission, fail-closed assembly, bounded streams, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import structlog.testing
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import wait_until
from tokenwire.auth.config import AuthConfig
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.backend import (
    Capabilities,
    FinishReason,
    LoadReport,
    TextChunk,
    TextRequest,
)
from tokenwire.config import LimitsConfig
from tokenwire.context import current_call
from tokenwire.errors import ConfigError, InternalError
from tokenwire.interceptors import ErrorsInterceptor
from tokenwire.moderation.config import ModerationConfig
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc, models_pb2
from tokenwire.server import TokenwireServer
from tokenwire.services.converse import MERGE_TOKENS, Outbox
from tokenwire.stores.conversations import Conversation
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

CONVERSE = "/tokenwire.v1.ChatService/Converse"
COMPLETE = "/tokenwire.v1.ChatService/Complete"


class CountingStore(SQLiteConversationStore):
    """The real SQLite store, counting the conversations and messages written to it."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.conversations: list[str] = []
        self.messages: list[tuple[str, str]] = []  # (role, content)

    async def create_conversation(self, owner: str, *, title: str) -> Conversation:
        conversation = await super().create_conversation(owner, title=title)
        self.conversations.append(conversation.id)
        return conversation

    async def begin_turn(self, owner: str, conversation_id: str, **fields: Any) -> Any:
        begun = await super().begin_turn(owner, conversation_id, **fields)
        if begun.created_conversation:
            self.conversations.append(begun.turn.conversation_id)
        self.messages.append(("user", fields["content"]))
        return begun

    async def finish_turn(self, owner: str, conversation_id: str, *args: Any) -> bool:
        end = args[-1]
        self.messages.append(("assistant", end.answer))
        return await super().finish_turn(owner, conversation_id, *args)

    async def add_message(self, owner: str, conversation_id: str, **fields: Any) -> Any:
        self.messages.append((fields["role"], fields["content"]))
        return await super().add_message(owner, conversation_id, **fields)


def _retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
    status = status_pb2.Status.FromString(raw if isinstance(raw, bytes) else raw.encode())
    for detail in status.details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry
    return None


# --- admission ------------------------------------------------------------------------


async def test_a_burst_of_complete_calls_is_admitted_or_refused_before_anything_is_stored() -> None:
    """3 x max_running concurrent turns: each completes or is refused before TurnStarted."""
    fake = FakeBackend(reply="abcdef", token_delay_s=0.02, max_running=4)
    store = CountingStore()
    async with running_server(fake, store=store) as running:

        async def one() -> tuple[list[str], grpc.aio.AioRpcError | None]:
            kinds: list[str] = []
            try:
                async for event in running.chat.Complete(chat_pb2.CompleteRequest(message="go")):
                    kinds.append(event.WhichOneof("event"))
            except grpc.aio.AioRpcError as error:
                return kinds, error
            return kinds, None

        results = await asyncio.gather(*(one() for _ in range(12)))
    done = [kinds for kinds, error in results if error is None]
    refused = [(kinds, error) for kinds, error in results if error is not None]
    assert 4 == len(done)
    assert all(k[0] == "started" and k[-1] == "finished" for k in done)
    assert 8 == len(refused)
    for kinds, error in refused:
        assert [] == kinds  # nothing sent before the refusal
        assert grpc.StatusCode.RESOURCE_EXHAUSTED == error.code()
        assert _retry_info(error) is not None
    assert 4 == len(store.conversations)  # no orphan conversation
    assert sorted([("user", "go"), ("assistant", "abcdef")] * 4) == sorted(store.messages)
    assert 4 == len(fake.requests)  # the engine never saw, let alone refused, a fifth turn


async def test_a_burst_of_converse_turns_is_admitted_or_refused_before_turn_started() -> None:
    """Refused Converse turns get a RESOURCE_EXHAUSTED TurnError and no TurnStarted."""
    fake = FakeBackend(reply="abcdef", token_delay_s=0.02, max_running=2)
    store = CountingStore()
    async with running_server(fake, store=store) as running:

        async def one() -> list[chat_pb2.ConverseResponse]:
            call = running.chat.Converse()
            await call.write(chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message="go")))
            await call.done_writing()
            return [event async for event in call]

        results = await asyncio.gather(*(one() for _ in range(6)))
    kinds = [[e.WhichOneof("event") for e in events] for events in results]
    admitted = [k for k in kinds if k[0] == "started"]
    refused = [events for events in results if events[0].WhichOneof("event") == "error"]
    assert 2 == len(admitted)
    assert 4 == len(refused)
    for events in refused:
        assert 1 == len(events)
        assert grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] == events[0].error.code
        assert events[0].error.retry_after_s > 0
    assert 2 == len(store.conversations)
    assert sorted(["user", "assistant"] * 2) == sorted(role for role, _ in store.messages)


async def test_capacity_frees_as_turns_end_so_sequential_turns_are_never_refused() -> None:
    """With max_running=1, twenty turns one after the other all complete."""
    fake = FakeBackend(reply="ok", max_running=1)
    async with running_server(fake) as running:
        for _ in range(20):
            events = [
                e async for e in running.chat.Complete(chat_pb2.CompleteRequest(message="go"))
            ]
            assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason
        assert 0 == running.server._chat.turns.capacity().used  # type: ignore[union-attr]


# --- fail closed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chain",
    [
        pytest.param([], id="no chain"),
        pytest.param([AuthInterceptor(AuthConfig(enabled=False), "")], id="no errors"),
        pytest.param([ErrorsInterceptor()], id="no authentication"),
        pytest.param(
            [AuthInterceptor(AuthConfig(enabled=False), ""), ErrorsInterceptor()],
            id="errors not first",
        ),
    ],
)
def test_a_server_refuses_a_chain_it_cannot_serve_safely(chain: list[Any]) -> None:
    """A chain without the errors interceptor first and an authenticator is a ConfigError."""
    with pytest.raises(ConfigError):
        TokenwireServer(config_for_tests(), backend=FakeBackend(), interceptors=chain)


def test_the_call_state_outside_a_call_is_an_error() -> None:
    """current_call() outside a bound call raises instead of inventing an anonymous caller."""
    with pytest.raises(InternalError):
        current_call()


async def test_a_custom_chain_keeps_the_configured_moderation() -> None:
    """Replacing the chain does not turn the configured moderation off."""
    config = config_for_tests(moderation=ModerationConfig(enabled=True, moderator="rules"))
    chain = [ErrorsInterceptor(), AuthInterceptor(AuthConfig(enabled=False), "")]
    async with running_server(FakeBackend(), config, interceptors=chain) as running:
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="I will kill you"))
        code = await call.code()
    assert grpc.StatusCode.INVALID_ARGUMENT == code


# --- bounded streams --------------------------------------------------------------------


async def test_a_converse_client_that_never_reads_stops_its_own_turn() -> None:
    """A client that never reads: the turn stops pulling from the engine; the outbox stays small."""
    config = config_for_tests()
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, converse_outbox_messages=4)
    )
    fake = FakeBackend(reply="x", endless=True, tokens_per_chunk=64, context_length=10**7)
    async with (
        running_server(fake, config) as running,
        # No BDP probing: the client's receive window stays at 64 KiB, so it fills at once.
        grpc.aio.insecure_channel(running.address, options=[("grpc.http2.bdp_probe", 0)]) as ch,
    ):
        call = chat_pb2_grpc.ChatServiceStub(ch).Converse()
        params = chat_pb2.SamplingParams(max_tokens=5_000_000)
        await call.write(
            chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message="go", params=params))
        )
        await wait_until(lambda: bool(fake.requests))
        await asyncio.sleep(1.0)  # the send window (a few MB) fills long before this
        first = fake.requests[0].tokens_sent
        await asyncio.sleep(0.5)
        second = fake.requests[0].tokens_sent
        chat = running.server._chat
        assert chat is not None
        held = [len(session._out) for session in chat._sessions]
        call.cancel()
    assert first == second, "the engine kept generating for a client that reads nothing"
    assert second < 5_000_000
    assert [4] == held


async def test_the_outbox_merges_waiting_deltas_and_blocks_when_full() -> None:
    """Waiting deltas merge up to MERGE_TOKENS; other messages wait for room."""
    outbox = Outbox(limit=2)
    delta = chat_pb2.ConverseResponse(delta=chat_pb2.Delta(text="a", token_count=1))
    error = chat_pb2.ConverseResponse(error=chat_pb2.TurnError(code=3))
    await outbox.put(delta)
    for _ in range(MERGE_TOKENS - 1):
        await outbox.put(chat_pb2.ConverseResponse(delta=chat_pb2.Delta(text="b", token_count=1)))
    await outbox.put(error)  # the second slot
    blocked = asyncio.create_task(outbox.put(error))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # full: the third message waits
    first = await outbox.get()
    await asyncio.wait_for(blocked, 1)
    assert first is not None
    assert ("a" + "b" * (MERGE_TOKENS - 1), MERGE_TOKENS) == (
        first.delta.text,
        first.delta.token_count,
    )
    assert 2 == len(outbox)


async def test_a_paced_engine_gets_one_message_per_token_when_the_client_keeps_up() -> None:
    """Coalescing only merges what waits: a paced engine and a reading client see every token."""
    async with running_server(FakeBackend(reply="abcdefgh", token_delay_s=0.01)) as running:
        events = [e async for e in running.chat.Complete(chat_pb2.CompleteRequest(message="go"))]
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert list("abcdefgh") == [d.text for d in deltas]
    assert [1] * 8 == [d.token_count for d in deltas]


async def test_chunks_that_are_ready_at_once_go_out_as_one_delta() -> None:
    """An engine that is always ready gets merged deltas: 64 tokens in at most 4 messages."""
    config = config_for_tests()
    assert 16 == config.server.coalesce_chunks
    # No time bound on merging here, so a loaded machine cannot make the count vary.
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, coalesce_budget_us=1e9)
    )
    fake = FakeBackend(reply="abcd", endless=True)
    async with running_server(fake, config) as running:
        request = chat_pb2.CompleteRequest(
            message="go", params=chat_pb2.SamplingParams(max_tokens=64)
        )
        events = [e async for e in running.chat.Complete(request)]
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert "abcd" * 16 == "".join(d.text for d in deltas)
    assert 64 == sum(d.token_count for d in deltas)
    assert len(deltas) <= 4
    assert chat_pb2.FINISH_REASON_LENGTH == events[-1].finished.finish_reason


# --- bad input ------------------------------------------------------------------------

_INVALID_UTF8 = b"\x12\x02\xff\xfe"  # field 2 (message), a string of two bytes that are not UTF-8


async def test_invalid_utf8_on_complete_is_invalid_argument(served: RunningServer) -> None:
    """A Complete request whose message is not UTF-8 gets INVALID_ARGUMENT, plainly worded."""
    call = served.channel.unary_stream(COMPLETE)(_INVALID_UTF8)
    code, details = await call.code(), await call.details()
    assert grpc.StatusCode.INVALID_ARGUMENT == code
    assert "could not be decoded" in details
    assert "google.protobuf" not in details
    assert "DecodeError" not in details


async def test_undecodable_unary_request_is_invalid_argument(served: RunningServer) -> None:
    """A unary request that is not valid wire format gets INVALID_ARGUMENT."""
    method = served.channel.unary_unary(
        "/tokenwire.v1.ModelService/ListModels",
        response_deserializer=models_pb2.ListModelsResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await method(b"\x0a\x05ab")  # a length-delimited field that is cut short
    assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()


async def test_invalid_utf8_on_converse_is_a_turn_error_and_the_stream_goes_on(
    served: RunningServer,
) -> None:
    """An undecodable ConverseRequest gets an INVALID_ARGUMENT TurnError; the next turn runs."""
    call = served.channel.stream_stream(
        CONVERSE, response_deserializer=chat_pb2.ConverseResponse.FromString
    )()
    await call.write(b"\x0a\x04" + _INVALID_UTF8)  # StartTurn (field 1) holding the bad message
    start = chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message="Hi"))
    await call.write(start.SerializeToString())
    await call.done_writing()
    events = [event async for event in call]
    kinds = [e.WhichOneof("event") for e in events]
    assert "error" == kinds[0]
    assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == events[0].error.code
    assert ["started", "finished"] == [kinds[1], kinds[-1]]
    assert grpc.StatusCode.OK == await call.code()


async def test_a_converse_request_with_no_action_is_invalid_argument(
    served: RunningServer,
) -> None:
    """A ConverseRequest with neither start nor cancel is bad input, not a bad state."""
    call = served.chat.Converse()
    await call.write(chat_pb2.ConverseRequest())
    await call.done_writing()
    events = [event async for event in call]
    assert 1 == len(events)
    assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == events[0].error.code


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"params": chat_pb2.SamplingParams(stop=["é" * 129])}, id="stop"),
        pytest.param({"idempotency_key": "é" * 65}, id="idempotency_key"),
    ],
)
async def test_limits_stated_in_bytes_are_checked_in_bytes(
    served: RunningServer, fields: dict[str, Any]
) -> None:
    """129 two-byte characters are 258 bytes: over the 256-byte stop and 128-byte key limits."""
    limits = LimitsConfig()
    assert (256, 128) == (limits.max_stop_bytes, limits.max_idempotency_key_bytes)
    call = served.chat.Complete(chat_pb2.CompleteRequest(message="hi", **fields))
    assert grpc.StatusCode.INVALID_ARGUMENT == await call.code()
    assert "bytes" in await call.details()


# --- the listener ---------------------------------------------------------------------


async def test_a_second_server_on_a_busy_port_fails_instead_of_sharing_it() -> None:
    """reuse_port is off by default: binding a port in use is a ConfigError."""
    async with running_server(FakeBackend()) as first:
        port = first.server.port
        config = config_for_tests()
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, listen=f"127.0.0.1:{port}")
        )
        assert not config.server.reuse_port
        second = TokenwireServer(
            config, backend=FakeBackend(), store=SQLiteConversationStore(":memory:")
        )
        with pytest.raises(ConfigError):
            await second.start()


# --- text backends --------------------------------------------------------------------


class ShoutingTextBackend:
    """A text backend: answers with the conversation's user messages, upper-cased."""

    def __init__(self) -> None:
        self.requests: list[TextRequest] = []

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(model="shout", context_length=4096, max_batch=4)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def load(self) -> LoadReport:
        return LoadReport()

    async def generate_text(self, request: TextRequest) -> AsyncIterator[TextChunk]:
        self.requests.append(request)
        words = [m.content.upper() for m in request.messages if m.role == "user"]
        for word in words:
            yield TextChunk(word + " ", token_count=1)
        yield TextChunk("", finish_reason=FinishReason.STOP, prompt_tokens=7)


async def test_a_text_backend_answers_through_a_server_with_history() -> None:
    """A TextBackend gets the conversation as messages; its text and usage reach the client."""
    backend = ShoutingTextBackend()
    async with running_server(backend) as running:  # type: ignore[arg-type]
        first = [e async for e in running.chat.Complete(chat_pb2.CompleteRequest(message="hello"))]
        conversation = first[0].started.conversation_id
        second = [
            e
            async for e in running.chat.Complete(
                chat_pb2.CompleteRequest(message="again", conversation_id=conversation)
            )
        ]
        await wait_until(lambda: running.server._chat.turns.active == 0)  # type: ignore[union-attr]
    text = "".join(e.delta.text for e in second if e.HasField("delta"))
    assert "HELLO AGAIN " == text
    finished = second[-1].finished
    assert (chat_pb2.FINISH_REASON_STOP, 7, 2) == (
        finished.finish_reason,
        finished.usage.prompt_tokens,
        finished.usage.completion_tokens,
    )
    assert ["user", "assistant", "user"] == [m.role for m in backend.requests[1].messages]
    assert "HELLO " == backend.requests[1].messages[1].content


async def test_a_server_with_authentication_off_says_so_at_start() -> None:
    """Authentication off: a warning at start names the shared anonymous caller."""
    with structlog.testing.capture_logs() as logs:
        async with running_server(FakeBackend()):
            pass
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert any("authentication is OFF" in e["event"] for e in warnings)
    assert any("default/anonymous" in e["event"] for e in warnings)
