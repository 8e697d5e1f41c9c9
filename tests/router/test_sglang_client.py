"""The router over SGLang's SglangScheduler (gRPC mode), against its stand-in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from tests.router.standin_gateway import (
    failing_turn,
    routed_over,
    standin_gateway,
    text_of,
    turn,
    until,
)
from tokenwire.backend import Engine, FinishReason, GenerateRequest
from tokenwire.errors import ResourceExhaustedError, UnavailableError
from tokenwire.proto.v1 import chat_pb2
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine
from tokenwire.router.sglang import SglangClient, request_message
from tokenwire.testing.conformance import EngineConformance
from tokenwire.testing.fake import FakeBackend
from tokenwire.testing.server import RunningServer
from tokenwire.testing.standins.server import RunningStandin, running_standin


@pytest.fixture
async def routed() -> AsyncIterator[Engine]:
    """A RoutedEngine over one sglang stand-in serving a paced fake engine."""
    async with routed_over("sglang") as engine:
        yield engine


class TestSglangConformance(EngineConformance):
    """Everything the framework relies on holds across SglangScheduler."""

    @pytest.fixture
    def engine(self, routed: Engine) -> Engine:
        """The router, speaking SglangScheduler to its worker."""
        return routed


def gateway(
    *fakes: FakeBackend, standin: dict[str, Any] | None = None, **router: Any
) -> contextlib.AbstractAsyncContextManager[
    tuple[RunningServer, RoutedEngine, list[RunningStandin]]
]:
    """A gateway routing over one sglang stand-in per fake engine."""
    return standin_gateway("sglang", *fakes, standin=standin, **router)


async def test_a_gateway_streams_turns_from_an_sglang_worker() -> None:
    """A turn streams from SGLang's protocol, every sampling field sent explicitly."""
    async with gateway(FakeBackend(reply="Hello from SGLang")) as (running, _, [sgl]):
        events = await turn(running)
    sent = sgl.servicer.requests[0]
    params = sent.sampling_params
    assert "Hello from SGLang" == text_of(events)
    assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason
    assert (True, 1.0, -1, 1.0, 1) == (
        sent.stream,
        params.top_p,
        params.top_k,
        params.repetition_penalty,
        params.n,
    )


async def test_the_stop_token_sglang_sends_is_not_passed_on() -> None:
    """SGLang sends the matched stop token last and repeats the last chunk's ids in its
    GenerateComplete; the client passes on neither, and counts what it passed on."""
    request = GenerateRequest("r-1", [1, 2], max_tokens=50, stop_token_ids=frozenset({ord("l")}))
    async with running_standin("sglang", FakeBackend(reply="Hello")) as sgl:
        async with grpc.aio.insecure_channel(sgl.address) as channel:
            wire = [
                m
                async for m in pb_grpc.SglangSchedulerStub(channel).Generate(
                    request_message(request)
                )
            ]
        client = SglangClient(sgl.address)
        chunks = [chunk async for chunk in client.generate(request)]
        await client.close()
    *_, last, complete = wire
    assert list(b"Hel") == [t for m in wire[:-1] for t in m.chunk.token_ids]
    assert (list(last.chunk.token_ids), ord("l")) == (
        list(complete.complete.output_ids),
        complete.complete.matched_token_id,
    )
    assert b"He" == bytes(t for c in chunks for t in c.token_ids)
    assert (FinishReason.STOP, 2) == (chunks[-1].finish_reason, chunks[-1].completion_tokens)


async def test_load_from_get_loads_reaches_the_fleet_view() -> None:
    """Another gateway's request on an SGLang worker shows in the router's fleet through
    GetLoads: running, KV use and the worker's slots."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01, max_running=4)
    async with gateway(fake) as (_, engine, [sgl]):
        state = engine.fleet.workers[sgl.target]
        elsewhere = fake.generate(GenerateRequest("other", [1, 2, 3], max_tokens=500))
        await anext(elsewhere)
        await until(lambda: state.load.running == 1)
        seen = (state.load.running, state.others, state.max_running)
        kv = engine.load().kv_cache_usage
        await elsewhere.aclose()  # type: ignore[attr-defined]
        await until(lambda: state.load.running == 0)
        after = (state.load.running, state.others)
    assert ((1, 1, 4), 0.25) == (seen, kv)
    assert (0, 0) == after


async def test_a_saturated_sglang_fleet_refuses_turns_before_they_start() -> None:
    """With the slots GetLoads reports taken, a turn is RESOURCE_EXHAUSTED."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01, max_running=1)
    async with gateway(fake, max_queue_per_slot=0.0) as (running, _, _):
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="one"))
        stream = aiter(call)
        await anext(stream)
        await anext(stream)
        code, text = await failing_turn(running)
        call.cancel()
    assert (grpc.StatusCode.RESOURCE_EXHAUSTED, "") == (code, text)
    assert 1 == len(fake.requests)


async def test_health_comes_from_the_standard_health_service() -> None:
    """SGLang's HealthCheck RPC takes a second or more; the router asks grpc.health.v1
    instead, and a worker shutting down leaves rotation at once."""
    slow = {"health_check_delay_s": 30.0}
    async with gateway(FakeBackend(reply="ok"), standin=slow) as (running, engine, [sgl]):
        answered = text_of(await turn(running))
        sgl.servicer.shutting_down = True
        await until(lambda: not engine.fleet.usable())
        left = not engine.fleet.usable()
    assert ("ok", True) == (answered, left)


async def test_without_the_health_service_the_healthcheck_rpc_decides() -> None:
    """A server without grpc.health.v1 is asked with SGLang's own HealthCheck RPC."""
    options = {"health_service": False, "health_check_delay_s": 0.0}
    async with gateway(FakeBackend(reply="ok"), standin=options) as (running, engine, [sgl]):
        answered = text_of(await turn(running))
        sgl.servicer.shutting_down = True
        await until(lambda: not engine.fleet.usable())
        left = not engine.fleet.usable()
    assert ("ok", True) == (answered, left)


async def test_a_cancelled_turn_aborts_on_the_sglang_worker() -> None:
    """A client leaving mid-answer cancels the call and sends Abort by request id;
    the engine's work stops."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01)
    async with gateway(fake) as (running, _, [sgl]):
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="go"))
        stream = aiter(call)
        await anext(stream)
        await anext(stream)
        call.cancel()
        request_id = sgl.servicer.requests[0].request_id
        await until(lambda: request_id in sgl.servicer.abort_calls and not fake.running)
    assert [request_id] == sgl.servicer.abort_calls
    assert [request_id] == sgl.runner.cancelled
    assert (0, True) == (fake.running, fake.requests[0].closed)


async def test_abort_by_request_id_ends_the_stream_with_an_error() -> None:
    """SGLang ends an aborted request's stream with an error status: mid-answer, the
    client reports UNAVAILABLE."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01)
    async with running_standin("sglang", fake) as sgl:
        client = SglangClient(sgl.address)
        stream = client.generate(GenerateRequest("r-1", [1, 2, 3], max_tokens=500))
        await anext(stream)
        async with grpc.aio.insecure_channel(sgl.address) as channel:
            reply = await pb_grpc.SglangSchedulerStub(channel).Abort(
                pb.AbortRequest(request_id="r-1")
            )
            with pytest.raises(UnavailableError, match="middle of an answer"):
                async for _ in stream:
                    pass
        await client.close()
    assert (True, ["r-1"]) == (reply.success, sgl.runner.aborted)


async def test_a_full_sglang_queue_is_retried_elsewhere() -> None:
    """A full scheduler queue (UNAVAILABLE from SGLang) before the first token costs the
    client nothing: another worker answers."""
    full, good = FakeBackend(reply="never", max_running=0), FakeBackend(reply="answered")
    async with gateway(full, good, policy="round_robin") as (running, _, [bad, _]):
        texts = [text_of(await turn(running)) for _ in range(4)]
    assert ["answered"] * 4 == texts
    assert bad.servicer.requests


async def test_a_full_sglang_queue_is_at_capacity_and_an_outage_unavailable() -> None:
    """Before the first token, SGLang's full queue (UNAVAILABLE "The request queue is
    full.") is RESOURCE_EXHAUSTED; a server that is gone stays UNAVAILABLE."""
    request = GenerateRequest("r-1", [1, 2, 3], max_tokens=5)
    async with running_standin("sglang", FakeBackend(reply="ok")) as sgl:
        sgl.servicer.queue_full = True
        client = SglangClient(sgl.address)
        with pytest.raises(ResourceExhaustedError) as full:
            _ = [chunk async for chunk in client.generate(request)]
        await client.close()
    client = SglangClient(sgl.address)
    with pytest.raises(UnavailableError, match="before answering"):
        _ = [chunk async for chunk in client.generate(request)]
    await client.close()
    assert 1.0 == full.value.retry_after_s


async def test_a_full_sglang_queue_leaves_the_worker_in_rotation() -> None:
    """A worker refusing for a full queue is busy, not failing: its turns go to another
    worker and it is not ejected, even with router.eject_after_failures=1."""
    busy, good = FakeBackend(reply="never"), FakeBackend(reply="answered")
    async with gateway(busy, good, policy="round_robin", eject_after_failures=1) as (
        running,
        engine,
        [full, _],
    ):
        full.servicer.queue_full = True
        texts = [text_of(await turn(running)) for _ in range(4)]
        usable = engine.fleet.usable()
        kept = (engine.fleet.workers[full.target] in usable, len(usable))
    assert ["answered"] * 4 == texts
    assert (True, 2) == kept
    assert [] != full.servicer.requests


async def test_an_sglang_worker_failing_before_the_first_token_is_ejected() -> None:
    """An engine failure before the first token is retried elsewhere, and counts: with
    router.eject_after_failures=1 the worker leaves rotation."""
    broken, good = FakeBackend(reply="never", fail_after=0), FakeBackend(reply="answered")
    async with gateway(
        broken, good, policy="round_robin", eject_after_failures=1, eject_s=60.0
    ) as (
        running,
        engine,
        [failing, _],
    ):
        texts = [text_of(await turn(running)) for _ in range(4)]
        # Out of rotation for router.eject_s, whatever its health checks say meanwhile.
        usable = engine.fleet.usable()
        kept = (engine.fleet.workers[failing.target] in usable, len(usable))
    assert ["answered"] * 4 == texts
    assert (False, 1) == kept
    assert [] != failing.servicer.requests


async def test_a_slow_health_check_holds_up_no_other_workers_polls() -> None:
    """SGLang's HealthCheck RPC (on a server without grpc.health.v1) takes a second;
    meanwhile the router polls its other workers at the usual pace."""
    slow_health = {"health_service": False, "health_check_delay_s": 1.0}
    async with contextlib.AsyncExitStack() as stack:
        slow = await stack.enter_async_context(
            running_standin("sglang", FakeBackend(), **slow_health)
        )
        fast = await stack.enter_async_context(running_standin("sglang", FakeBackend()))
        config = RouterConfig(workers=f"{slow.target},{fast.target}", poll_interval_s=0.02)
        engine = RoutedEngine(config)
        await engine.start()
        try:
            await until(lambda: slow.servicer.health_checks >= 1)
            before = fast.servicer.load_calls
            await asyncio.sleep(0.5)  # within the slow worker's HealthCheck
            polled = fast.servicer.load_calls - before
        finally:
            await engine.close()
    assert polled >= 10, f"the other worker was polled {polled} times in 0.5 s"


async def test_an_sglang_failure_mid_answer_is_unavailable() -> None:
    """An engine failing after the first token ends the turn UNAVAILABLE, text kept."""
    async with gateway(FakeBackend(reply="abcdefgh", fail_after=3)) as (running, _, _):
        failed = await failing_turn(running)
    assert (grpc.StatusCode.UNAVAILABLE, "abc") == failed
