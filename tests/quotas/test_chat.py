"""Quotas on ChatService: Complete and Converse turns, token reservations settled exactly."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.quotas.conftest import as_principal, eventually, quota_chain, refused
from tokenwire.proto.v1 import chat_pb2
from tokenwire.quotas import PlanLimits, QuotaConfig, QuotaStore, Rate, Slot
from tokenwire.testing import FakeBackend, RunningServer, running_server

ALICE = as_principal("acme", "alice")
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
EON = 1e9  # a window so long that nothing drains measurably while a test runs
TOKENS = Rate("{acme}:u:alice:tpm", 1_000_000, EON)  # alice's token bucket in the exact tests


def quotas(window_s: float = EON, **limits: int) -> QuotaConfig:
    return QuotaConfig(window_s=window_s, plans={"default": PlanLimits(**limits)})


def start(message: str = "Hi", **fields: object) -> chat_pb2.ConverseRequest:
    return chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message=message, **fields))


async def complete(running: RunningServer, **fields: object) -> list[chat_pb2.CompleteResponse]:
    request = chat_pb2.CompleteRequest(message=str(fields.pop("message", "Hi")), **fields)
    return [event async for event in running.chat.Complete(request, metadata=ALICE)]


async def next_event(call: grpc.aio.StreamStreamCall, kind: str) -> chat_pb2.ConverseResponse:
    """Read a Converse stream until an event of ``kind`` arrives."""
    while True:
        event = await asyncio.wait_for(call.read(), 10)
        assert event is not grpc.aio.EOF, f"stream ended before a {kind} event"
        if event.WhichOneof("event") == kind:
            return event


async def used(store: QuotaStore, rate: Rate = TOKENS) -> int:
    return round(await store.used(rate))


async def test_complete_counts_one_request_not_two(store: QuotaStore) -> None:
    """Complete is one request (its turn is not counted again); the third of two is refused."""
    config = quotas(window_s=60.0, requests_per_minute=2)
    async with running_server(
        FakeBackend(reply="ok"), interceptors=quota_chain(config, store)
    ) as running:
        for _ in range(2):
            assert "finished" == (await complete(running))[-1].WhichOneof("event")
        refusal = await refused(complete(running))
    assert EXHAUSTED == refusal.code
    assert [("principal:acme/alice", "requests_per_minute")] == refusal.violations


async def test_health_checks_are_never_counted(store: QuotaStore) -> None:
    """grpc.health.v1 stays open to load balancers whatever the anonymous caller's quota."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = quotas(window_s=60.0, requests_per_minute=1)
    async with running_server(FakeBackend(), interceptors=quota_chain(config, store)) as running:
        health = health_pb2_grpc.HealthStub(running.channel)
        for _ in range(3):
            reply = await health.Check(health_pb2.HealthCheckRequest(), metadata=ALICE)
            assert health_pb2.HealthCheckResponse.SERVING == reply.status
        await complete(running)


async def test_complete_tokens_are_refused_with_a_true_delay(store: QuotaStore) -> None:
    """A turn whose reservation does not fit is refused; after the advertised delay it fits."""
    # 150 tokens per 1.5 s: one token refills every 10 ms.
    config = quotas(window_s=1.5, tokens_per_minute=150)
    async with running_server(
        FakeBackend(reply="abcdefghij"), interceptors=quota_chain(config, store)
    ) as running:
        params = chat_pb2.SamplingParams(max_tokens=120)
        first = await complete(running, params=params)
        usage = first[-1].finished.usage
        assert 10 == usage.completion_tokens
        refusal = await refused(complete(running, params=params))
        assert EXHAUSTED == refusal.code
        assert [("principal:acme/alice", "tokens_per_minute")] == refusal.violations
        assert refusal.retry_after_s is not None
        # The first turn settled to prompt + 10; the second reserves prompt + 120 and
        # lacks what exceeds 150 (less the little that refilled meanwhile).
        needed = 2 * usage.prompt_tokens + 10 + 120 - 150
        assert needed * 0.01 - 0.1 < refusal.retry_after_s <= needed * 0.01 + 0.001
        await asyncio.sleep(refusal.retry_after_s)
        assert "finished" == (await complete(running, params=params))[-1].WhichOneof("event")


async def test_a_turn_that_can_never_fit_is_refused_without_a_delay(store: QuotaStore) -> None:
    """prompt + max_tokens above the whole limit: RESOURCE_EXHAUSTED and no RetryInfo."""
    config = quotas(tokens_per_minute=50)
    async with running_server(FakeBackend(), interceptors=quota_chain(config, store)) as running:
        refusal = await refused(complete(running, params=chat_pb2.SamplingParams(max_tokens=60)))
    assert EXHAUSTED == refusal.code
    assert refusal.retry_after_s is None
    assert "lower max_tokens" in refusal.message
    assert [("principal:acme/alice", "tokens_per_minute")] == refusal.violations


async def test_tokens_settle_exactly_after_a_normal_end(store: QuotaStore) -> None:
    """After two turns the bucket holds exactly the prompt and completion tokens the client saw."""
    config = quotas(tokens_per_minute=TOKENS.limit)
    async with running_server(
        FakeBackend(reply="Hello, world!"), interceptors=quota_chain(config, store)
    ) as running:
        seen = 0
        for max_tokens in (0, 5):
            events = await complete(running, params=chat_pb2.SamplingParams(max_tokens=max_tokens))
            usage = events[-1].finished.usage
            seen += usage.prompt_tokens + usage.completion_tokens
            assert seen == await used(store)


async def test_tokens_settle_exactly_after_a_client_cancel(store: QuotaStore) -> None:
    """A Complete the client cancels is charged what the engine generated, not max_tokens."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.005)
    config = quotas(tokens_per_minute=TOKENS.limit)
    async with running_server(fake, interceptors=quota_chain(config, store)) as running:
        call = running.chat.Complete(
            chat_pb2.CompleteRequest(message="go", params=chat_pb2.SamplingParams(max_tokens=2000)),
            metadata=ALICE,
        )
        deltas = 0
        async for event in call:
            deltas += event.HasField("delta")
            if deltas == 3:
                break
        call.cancel()
        log = fake.requests[0]
        await eventually(lambda: asyncio.sleep(0, log.closed), True)
        expected = len(log.request.prompt_token_ids) + log.tokens_sent
        assert expected == await eventually(lambda: used(store), expected)
        assert 2000 > log.tokens_sent >= 3


async def test_tokens_settle_exactly_after_a_backend_failure(store: QuotaStore) -> None:
    """A turn the engine fails after 4 tokens is charged prompt + 4, on Complete and Converse."""
    fake = FakeBackend(reply="abcdefgh", fail_after=4)
    config = quotas(tokens_per_minute=TOKENS.limit)
    async with running_server(fake, interceptors=quota_chain(config, store)) as running:
        failed = await refused(complete(running))
        assert grpc.StatusCode.INTERNAL == failed.code
        prompt = len(fake.requests[0].request.prompt_token_ids)
        assert prompt + 4 == await eventually(lambda: used(store), prompt + 4)
        call = running.chat.Converse(metadata=ALICE)
        await call.write(start())
        error = (await next_event(call, "error")).error
        assert grpc.StatusCode.INTERNAL.value[0] == error.code
        await call.done_writing()
        assert grpc.StatusCode.OK == await call.code()
        second = prompt + 4 + len(fake.requests[1].request.prompt_token_ids) + 4
        assert second == await eventually(lambda: used(store), second)


async def test_tokens_settle_exactly_after_cancel_turn(store: QuotaStore) -> None:
    """A cancelled Converse turn is charged the usage its TurnFinished reports."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.005)
    config = quotas(tokens_per_minute=TOKENS.limit)
    async with running_server(fake, interceptors=quota_chain(config, store)) as running:
        call = running.chat.Converse(metadata=ALICE)
        await call.write(start(params=chat_pb2.SamplingParams(max_tokens=2000)))
        turn_id = (await next_event(call, "started")).started.turn_id
        await next_event(call, "delta")
        await call.write(chat_pb2.ConverseRequest(cancel=chat_pb2.CancelTurn(turn_id=turn_id)))
        finished = (await next_event(call, "finished")).finished
        assert chat_pb2.FINISH_REASON_CANCELLED == finished.finish_reason
        charged = finished.usage.prompt_tokens + finished.usage.completion_tokens
        assert charged == await eventually(lambda: used(store), charged)
        await call.done_writing()
        assert grpc.StatusCode.OK == await call.code()


async def test_converse_turns_are_counted_and_refused_per_turn(store: QuotaStore) -> None:
    """Each StartTurn is one request; an over-limit turn is a TurnError, and the stream lives on."""
    config = quotas(window_s=1.0, requests_per_minute=2)  # one turn refills every 0.5 s
    async with running_server(
        FakeBackend(reply="ok"), interceptors=quota_chain(config, store)
    ) as running:
        call = running.chat.Converse(metadata=ALICE)
        for _ in range(2):
            await call.write(start())
            await next_event(call, "finished")
        await call.write(start())
        error = (await next_event(call, "error")).error
        assert EXHAUSTED.value[0] == error.code
        assert "requests_per_minute" in error.message
        assert 0.4 < error.retry_after_s <= 0.5
        await asyncio.sleep(error.retry_after_s)
        await call.write(start())
        await next_event(call, "finished")
        await call.done_writing()
        assert grpc.StatusCode.OK == await call.code()


async def test_converse_tokens_are_refused_per_turn(store: QuotaStore) -> None:
    """A turn over tokens_per_minute is a TurnError with a delay; the stream stays open."""
    config = quotas(window_s=3600.0, tokens_per_minute=240)  # a 24-token prompt + 200 fits
    async with running_server(
        FakeBackend(reply="ok"), interceptors=quota_chain(config, store)
    ) as running:
        call = running.chat.Converse(metadata=ALICE)
        await call.write(start(params=chat_pb2.SamplingParams(max_tokens=200)))
        usage = (await next_event(call, "finished")).finished.usage
        # On Converse the turn settles just after TurnFinished is sent; let it land.
        settled = usage.prompt_tokens + usage.completion_tokens
        rate = Rate("{acme}:u:alice:tpm", 240, 3600.0)
        assert settled == await eventually(lambda: used(store, rate), settled)
        await call.write(start(params=chat_pb2.SamplingParams(max_tokens=200)))
        error = (await next_event(call, "error")).error
        assert (EXHAUSTED.value[0], "resource_exhausted") == (error.code, error.error_type)
        # The second turn (a new conversation, so the same prompt) reserves prompt + 200
        # and lacks what exceeds 240; one token refills every 3600 / 240 = 15 s.
        lacking = settled + usage.prompt_tokens + 200 - 240
        assert lacking * 15.0 - 1.0 < error.retry_after_s <= lacking * 15.0 + 0.001
        await call.write(start(params=chat_pb2.SamplingParams(max_tokens=2)))
        await next_event(call, "finished")  # a smaller turn still fits
        await call.done_writing()
        assert grpc.StatusCode.OK == await call.code()


@pytest.mark.parametrize("holder", ["Converse", "Complete"])
async def test_a_chat_stream_holds_its_slot_until_it_ends(store: QuotaStore, holder: str) -> None:
    """An open Converse or Complete takes the only slot; once it ends another stream gets it."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.01)
    slot = Slot("{acme}:u:alice:streams", 1)
    async with running_server(
        fake, interceptors=quota_chain(quotas(concurrent_streams=1), store)
    ) as running:
        if holder == "Converse":
            held = running.chat.Converse(metadata=ALICE)
            await held.write(start())
            await next_event(held, "delta")
        else:
            held = running.chat.Complete(chat_pb2.CompleteRequest(message="go"), metadata=ALICE)
            await held.read()
        refusal = await refused(complete(running))
        assert [("principal:acme/alice", "concurrent_streams")] == refusal.violations
        held.cancel()
        assert 0 == await eventually(lambda: store.in_use(slot), 0)
        await complete(running, params=chat_pb2.SamplingParams(max_tokens=3))
        assert 0 == await store.in_use(slot)
