"""A gateway routes turns over in-process workers through the real engine protocol."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

from tokenwire.proto.v1 import chat_pb2
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import (
    FakeBackend,
    RunningServer,
    config_for_tests,
    running_server,
    running_worker,
)
from tokenwire.worker.server import WorkerServer

OWNER = "default/anonymous"


@contextlib.asynccontextmanager
async def gateway(
    fakes: Sequence[FakeBackend],
    *,
    extra: Sequence[str] = (),
    store: SQLiteConversationStore | None = None,
    **router: object,
) -> AsyncIterator[tuple[RunningServer, RoutedEngine, list[WorkerServer]]]:
    """A gateway over one worker per fake engine (plus ``extra`` addresses)."""
    async with contextlib.AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(running_worker(f)) for f in fakes]
        config = RouterConfig(
            workers=",".join([*(w.address for w in workers), *extra]),
            poll_interval_s=0.02,
            **router,  # type: ignore[arg-type]
        )
        engine = RoutedEngine(config)
        running = await stack.enter_async_context(
            running_server(engine, config_for_tests(router=config), store=store)
        )
        yield running, engine, workers


async def turn(running: RunningServer, message: str = "hi", **fields: object) -> list[object]:
    request = chat_pb2.CompleteRequest(message=message, **fields)
    return [event async for event in running.chat.Complete(request)]


def text_of(events: Sequence[object]) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))  # type: ignore[attr-defined]


async def test_turns_stream_from_workers_with_the_workers_tokenizer() -> None:
    """A turn through the gateway streams the worker's tokens, detokenized by the gateway."""
    async with gateway([FakeBackend(reply="Hello from a worker")]) as (running, _, _):
        events = await turn(running)
    assert "Hello from a worker" == text_of(events)
    assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason  # type: ignore[attr-defined]


async def test_the_gateway_asks_workers_for_fewer_larger_messages() -> None:
    """router.message_interval_ms: an engine faster than the interval reaches the client
    in a few messages; 0 sends every token as it comes."""
    fast = FakeBackend(reply="y " * 20, token_delay_s=0.002)
    async with gateway([fast], message_interval_ms=20.0) as (running, _, _):
        merged = [e for e in await turn(running) if e.HasField("delta")]  # type: ignore[attr-defined]
    async with gateway([fast], message_interval_ms=0.0) as (running, _, _):
        each = [e for e in await turn(running) if e.HasField("delta")]  # type: ignore[attr-defined]
    assert "y " * 20 == text_of(merged) == text_of(each)
    assert len(merged) <= 10 < len(each)


async def test_least_requests_spreads_concurrent_turns_evenly() -> None:
    """Nine concurrent turns over three workers: three each with least_requests."""
    fakes = [FakeBackend(reply="x" * 20, token_delay_s=0.01) for _ in range(3)]
    async with gateway(fakes, policy="least_requests") as (running, _, _):
        await asyncio.gather(*(turn(running) for _ in range(9)))
    assert [3, 3, 3] == [len(f.requests) for f in fakes]


async def test_ttft_policy_keeps_a_conversation_on_its_worker() -> None:
    """With idle workers, a conversation's turns all go to the worker holding its prefix."""
    fakes = [FakeBackend(reply="ok") for _ in range(3)]
    async with gateway(fakes) as (running, _, _):
        first = await turn(running)
        conversation = first[0].started.conversation_id  # type: ignore[attr-defined]
        for _ in range(4):
            await turn(running, conversation_id=conversation)
    assert [5] == [len(f.requests) for f in fakes if f.requests]


async def test_a_worker_that_refuses_before_answering_is_retried_elsewhere() -> None:
    """Workers that are full or unreachable before the first token cost the client nothing."""
    full = FakeBackend(reply="never", max_running=0)
    good = FakeBackend(reply="answered")
    async with gateway([full, good], extra=["127.0.0.1:1"], policy="round_robin") as (
        running,
        _,
        _,
    ):
        texts = [text_of(await turn(running)) for _ in range(6)]
    assert ["answered"] * 6 == texts


async def test_a_failure_mid_answer_is_unavailable_and_keeps_the_partial_text() -> None:
    """A worker failing after the first token ends the turn with UNAVAILABLE; the text
    sent so far is stored as an incomplete answer."""
    store = SQLiteConversationStore(":memory:")
    async with gateway([FakeBackend(reply="abcdefgh", fail_after=3)], store=store) as (
        running,
        _,
        _,
    ):
        received: list[object] = []

        async def consume() -> None:
            async for event in running.chat.Complete(chat_pb2.CompleteRequest(message="go")):
                received.append(event)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await consume()
        conversation = received[0].started.conversation_id  # type: ignore[attr-defined]
        messages = await store.list_messages(OWNER, conversation)
    assert grpc.StatusCode.UNAVAILABLE == raised.value.code()
    assert "abc" == text_of(received)
    assert ("abc", False) == (messages[-1].content, messages[-1].complete)


async def test_saturated_workers_refuse_before_the_turn_starts() -> None:
    """With every worker full, a turn is RESOURCE_EXHAUSTED with RetryInfo, before TurnStarted."""
    busy = FakeBackend(reply="ab", endless=True, token_delay_s=0.01, max_running=1)
    async with gateway([busy], max_queue_per_slot=0.0) as (running, _, _):
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="one"))
        stream = aiter(call)
        await anext(stream)  # TurnStarted
        await anext(stream)  # a delta: the worker has the request
        received: list[object] = []

        async def consume() -> None:
            async for event in running.chat.Complete(chat_pb2.CompleteRequest(message="two")):
                received.append(event)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await consume()
        call.cancel()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED == raised.value.code()
    assert [] == received
    trailers = {k: v for k, v in raised.value.trailing_metadata() or ()}
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert 1 == len(busy.requests)


async def test_a_cancelled_turn_stops_the_worker_engine() -> None:
    """A client that cancels mid-answer stops the worker's engine within a step."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01)
    async with gateway([fake]) as (running, _, _):
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="go"))
        stream = aiter(call)
        await anext(stream)
        await anext(stream)
        call.cancel()
        for _ in range(100):
            if fake.running == 0:
                break
            await asyncio.sleep(0.01)
    assert 0 == fake.running
    assert fake.requests[0].closed


async def test_a_stopped_worker_is_ejected_and_a_restarted_one_rejoins() -> None:
    """Health checks take a dead worker out of rotation and bring it back when it returns."""
    a, b = FakeBackend(reply="a"), FakeBackend(reply="b")
    async with gateway([a, b], eject_s=0.1, policy="round_robin") as (running, engine, workers):
        gone = workers[1]
        port = gone.port
        await gone.stop(0)
        for _ in range(200):
            if len(engine.fleet.usable()) == 1:
                break
            await asyncio.sleep(0.02)
        assert 1 == len(engine.fleet.usable())
        assert ["a"] * 4 == [text_of(await turn(running)) for _ in range(4)]
        config = dataclasses.replace(
            gone.config, worker=dataclasses.replace(gone.config.worker, listen=f"127.0.0.1:{port}")
        )
        back = WorkerServer(config, engine=b)
        await back.start()
        try:
            for _ in range(300):
                if len(engine.fleet.usable()) == 2:
                    break
                await asyncio.sleep(0.02)
            texts = {text_of(await turn(running)) for _ in range(4)}
        finally:
            await back.stop(0)
    assert {"a", "b"} == texts


async def test_a_router_with_no_reachable_worker_fails_to_start() -> None:
    """A gateway whose workers never answer fails at start-up, naming them."""
    from tokenwire.errors import ConfigError

    engine = RoutedEngine(RouterConfig(workers="127.0.0.1:1", connect_timeout_s=0.3))
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:1"):
        async with running_server(engine):
            pass


async def test_affinity_yields_when_the_conversations_worker_is_busy() -> None:
    """The conversation's worker loses its next turn once its slots are taken by others."""
    fakes = [
        FakeBackend(reply=letter, endless=True, token_delay_s=0.01, max_running=2)
        for letter in "ab"
    ]
    one = chat_pb2.SamplingParams(max_tokens=1)  # one token: the worker's letter
    async with gateway(fakes) as (running, engine, workers):
        first = await turn(running, params=one)
        conversation = first[0].started.conversation_id  # type: ignore[attr-defined]
        home = text_of(first)
        again = await turn(running, conversation_id=conversation, params=one)
        assert home == text_of(again)
        # Another gateway's load takes both slots of the conversation's worker.
        busy = workers["ab".index(home)]
        async with grpc.aio.insecure_channel(busy.address) as channel:
            stub = pb_grpc.VllmEngineStub(channel)
            calls = [stub.Generate(_generate(f"other-{i}")) for i in range(2)]
            for call in calls:
                await anext(aiter(call))
            state = engine.fleet.workers[busy.address]
            for _ in range(200):  # until a load report shows it
                if state.load.running == 2:
                    break
                await asyncio.sleep(0.01)
            moved = await turn(running, conversation_id=conversation, params=one)
            for call in calls:
                call.cancel()
    assert 2 == state.load.running
    assert home != text_of(moved)


def _generate(request_id: str) -> object:
    return pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=[1, 2, 3]),
        sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=500),
        stream=True,
    )


async def test_a_worker_without_get_loads_is_routed_by_the_routers_own_counts() -> None:
    """A server that leaves GetLoads UNIMPLEMENTED (as some engines' servers do) stays in
    rotation on its health checks, its load counted from what the router sent it."""
    from tokenwire.worker import service

    original = service.EngineServicer.GetLoads

    async def unimplemented(
        self: object, request: object, context: grpc.aio.ServicerContext
    ) -> None:  # type: ignore[type-arg]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no GetLoads here")

    service.EngineServicer.GetLoads = unimplemented  # type: ignore[assignment,method-assign]
    try:
        fakes = [FakeBackend(reply="x" * 20, token_delay_s=0.01) for _ in range(2)]
        async with gateway(fakes, policy="least_requests") as (running, engine, _):
            await asyncio.sleep(0.1)  # several polls
            await asyncio.gather(*(turn(running) for _ in range(6)))
            usable = len(engine.fleet.usable())
    finally:
        service.EngineServicer.GetLoads = original  # type: ignore[method-assign]
    assert 2 == usable
    assert [3, 3] == [len(f.requests) for f in fakes]


async def test_a_worker_serving_another_model_gets_no_turns() -> None:
    """A worker whose model differs from the router's is left out of rotation."""
    same, other = FakeBackend(reply="same"), FakeBackend(reply="other", model="another")
    async with gateway([same, other], policy="round_robin") as (running, engine, workers):
        left_out = engine.fleet.workers[workers[1].address]
        for _ in range(200):
            if left_out.excluded:
                break
            await asyncio.sleep(0.01)
        texts = {text_of(await turn(running)) for _ in range(6)}
    assert "'another'" in left_out.excluded
    assert {"same"} == texts
