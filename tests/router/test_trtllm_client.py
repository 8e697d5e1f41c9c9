"""The router over TensorRT-LLM's TrtllmService (trtllm-serve --grpc), against its stand-in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from smg_grpc_proto import trtllm_service_pb2 as pb
from smg_grpc_proto import trtllm_service_pb2_grpc as pb_grpc

from tests.router.standin_gateway import (
    failing_turn,
    routed_over,
    standin_gateway,
    text_of,
    turn,
    until,
)
from tokenwire.backend import Engine, FinishReason, GenerateRequest
from tokenwire.errors import ConfigError
from tokenwire.proto.v1 import chat_pb2
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine, resolve_workers
from tokenwire.router.targets import WorkerEntry, parse_entry
from tokenwire.router.trtllm import TrtllmClient
from tokenwire.testing.conformance import EngineConformance
from tokenwire.testing.fake import FakeBackend
from tokenwire.testing.server import RunningServer, config_for_tests, running_server, running_worker
from tokenwire.testing.standins.server import RunningStandin, running_standin


@pytest.fixture
async def routed() -> AsyncIterator[Engine]:
    """A RoutedEngine over one trtllm stand-in serving a paced fake engine."""
    async with routed_over("trtllm") as engine:
        yield engine


class TestTrtllmConformance(EngineConformance):
    """Everything the framework relies on holds across TrtllmService."""

    @pytest.fixture
    def engine(self, routed: Engine) -> Engine:
        """The router, speaking TrtllmService to its worker."""
        return routed


def gateway(
    *fakes: FakeBackend, standin: dict[str, Any] | None = None, **router: Any
) -> contextlib.AbstractAsyncContextManager[
    tuple[RunningServer, RoutedEngine, list[RunningStandin]]
]:
    """A gateway routing over one trtllm stand-in per fake engine."""
    return standin_gateway("trtllm", *fakes, standin=standin, **router)


async def test_a_gateway_streams_turns_from_a_trtllm_worker() -> None:
    """A turn streams from trtllm-serve's protocol: token ids in, delta ids out, EOS its stop."""
    async with gateway(FakeBackend(reply="Hello from TensorRT-LLM")) as (running, _, [trt]):
        events = await turn(running)
    sent = trt.servicer.requests[0]
    assert "Hello from TensorRT-LLM" == text_of(events)
    assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason
    assert (True, True) == (sent.streaming, sent.output_config.exclude_input_from_output)
    assert {sent.request_id: FinishReason.STOP} == trt.runner.finished


async def test_a_mixed_fleet_spreads_turns_over_every_protocol() -> None:
    """A Tokenwire worker, a TensorRT-LLM and an SGLang worker share the turns alike."""
    fakes = [FakeBackend(reply="x" * 20, token_delay_s=0.005) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        worker = await stack.enter_async_context(running_worker(fakes[0]))
        trt = await stack.enter_async_context(running_standin("trtllm", fakes[1]))
        sgl = await stack.enter_async_context(running_standin("sglang", fakes[2]))
        targets = [worker.address, trt.target, sgl.target]
        config = RouterConfig(
            workers=",".join(targets), poll_interval_s=0.02, policy="least_requests"
        )
        engine = RoutedEngine(config)
        running = await stack.enter_async_context(
            running_server(engine, config_for_tests(router=config))
        )
        texts = await asyncio.gather(*(turn(running) for _ in range(9)))
        keys = sorted(engine.fleet.workers)
    assert ["x" * 20] * 9 == [text_of(t) for t in texts]
    assert [3, 3, 3] == [len(f.requests) for f in fakes]
    assert sorted(targets) == keys


async def test_a_trtllm_worker_is_counted_by_the_router_and_kept_by_its_health() -> None:
    """TrtllmService has no load call: the router counts its own requests, takes the
    worker's slots from router.default_max_running, and HealthCheck's status decides."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01)
    async with gateway(fake, default_max_running=8) as (running, engine, [trt]):
        state = engine.fleet.workers[trt.target]
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="go"))
        stream = aiter(call)
        await anext(stream)
        await anext(stream)
        busy = (state.in_flight, state.load.running, state.max_running)
        call.cancel()
        trt.servicer.unhealthy = "Executor is unhealthy"
        await until(lambda: not engine.fleet.usable())
        out_of_rotation = not engine.fleet.usable()
        trt.servicer.unhealthy = ""
        await until(lambda: bool(engine.fleet.usable()))
        back = len(engine.fleet.usable())
        reports_loads = state.handle.reports_loads  # type: ignore[attr-defined]
    assert ((1, 0, 8), False) == (busy, reports_loads)
    assert (True, 1) == (out_of_rotation, back)


async def test_a_health_round_asks_a_worker_without_a_load_call_once() -> None:
    """Without a load call the poll is a HealthCheck: a poll round that also checks
    health sends one, not two (the probe at start sends the other one here)."""
    async with running_standin("trtllm", FakeBackend(reply="ok")) as trt:
        engine = RoutedEngine(RouterConfig(workers=trt.target, poll_interval_s=3600.0))
        await engine.start()
        try:
            await until(lambda: trt.servicer.health_checks >= 2)
            await asyncio.sleep(0.1)  # room for a second check in the round, if one came
            checks = trt.servicer.health_checks
        finally:
            await engine.close()
    assert 2 == checks


async def test_a_saturated_trtllm_fleet_refuses_turns_before_they_start() -> None:
    """With router.default_max_running slots taken, a turn is RESOURCE_EXHAUSTED."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01)
    async with gateway(fake, default_max_running=1, max_queue_per_slot=0.0) as (running, _, _):
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="one"))
        stream = aiter(call)
        await anext(stream)
        await anext(stream)
        code, text = await failing_turn(running)
        call.cancel()
    assert (grpc.StatusCode.RESOURCE_EXHAUSTED, "") == (code, text)
    assert 1 == len(fake.requests)


async def test_a_cancelled_turn_aborts_on_the_trtllm_worker() -> None:
    """A client leaving mid-answer cancels the call and sends Abort by request id;
    the engine's work stops."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01)
    async with gateway(fake) as (running, _, [trt]):
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="go"))
        stream = aiter(call)
        await anext(stream)
        await anext(stream)
        call.cancel()
        request_id = trt.servicer.requests[0].request_id
        await until(lambda: request_id in trt.servicer.abort_calls and not fake.running)
    assert [request_id] == trt.servicer.abort_calls
    assert [request_id] == trt.runner.cancelled
    assert (0, True) == (fake.running, fake.requests[0].closed)


async def test_abort_by_request_id_ends_the_answer_cancelled() -> None:
    """TrtllmService's Abort ends the running answer with finish reason "cancelled"."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01)
    async with running_standin("trtllm", fake) as trt:
        client = TrtllmClient(trt.address)
        stream = client.generate(GenerateRequest("r-1", [1, 2, 3], max_tokens=500))
        await anext(stream)
        async with grpc.aio.insecure_channel(trt.address) as channel:
            stub = pb_grpc.TrtllmServiceStub(channel)
            found = await stub.Abort(pb.AbortRequest(request_id="r-1"))
            chunks = [chunk async for chunk in stream]
            again = await stub.Abort(pb.AbortRequest(request_id="r-1"))
        await client.close()
    assert (True, False) == (found.success, again.success)
    assert FinishReason.CANCELLED == chunks[-1].finish_reason


async def test_a_failing_trtllm_worker_is_retried_elsewhere_before_the_first_token() -> None:
    """An engine error before the first token (INTERNAL from trtllm-serve) costs the
    client nothing: another worker answers."""
    full, good = FakeBackend(reply="never", max_running=0), FakeBackend(reply="answered")
    async with gateway(full, good, policy="round_robin") as (running, _, [bad, _]):
        texts = [text_of(await turn(running)) for _ in range(4)]
    assert ["answered"] * 4 == texts
    assert bad.servicer.requests


async def test_a_trtllm_failure_mid_answer_is_unavailable() -> None:
    """An engine failing after the first token ends the turn UNAVAILABLE, text kept."""
    async with gateway(FakeBackend(reply="abcdefgh", fail_after=3)) as (running, _, _):
        failed = await failing_turn(running)
    assert (grpc.StatusCode.UNAVAILABLE, "abc") == failed


async def test_a_worker_without_get_tokenizer_takes_router_tokenizer(tmp_path: Path) -> None:
    """A trtllm-serve without GetTokenizer fails the start at once, naming router.tokenizer;
    with it set, the router loads the tokenizer from that directory."""
    async with running_standin("trtllm", FakeBackend(), serve_tokenizer=False) as trt:
        without = RoutedEngine(RouterConfig(workers=trt.target, connect_timeout_s=30))
        with pytest.raises(ConfigError, match=r"router\.tokenizer"):
            await asyncio.wait_for(without.start(), 5)
        await without.close()
        config = RouterConfig(workers=trt.target, tokenizer=str(tmp_path))
        with_dir = RoutedEngine(config)
        await with_dir.start()
        source = with_dir.capabilities.tokenizer
        await with_dir.close()
    assert source is not None
    assert str(tmp_path) == source.path


def test_worker_entries_name_their_protocol() -> None:
    """A scheme picks the protocol, +dns resolves; no scheme is VllmEngine."""
    assert [
        WorkerEntry("vllm", "10.0.0.5:50061"),
        WorkerEntry("trtllm", "10.0.0.6:50051"),
        WorkerEntry("sglang", "sgl.svc:30000", dns=True),
        WorkerEntry("vllm", "w.svc:50061", dns=True),
    ] == [
        parse_entry(e)
        for e in (
            "10.0.0.5:50061",
            "trtllm://10.0.0.6:50051",
            "sglang+dns:///sgl.svc:30000",
            "dns:///w.svc:50061",
        )
    ]
    with pytest.raises(ConfigError, match="unknown scheme"):
        RouterConfig(workers="10.0.0.5:1, triton://10.0.0.7:8001")


async def test_dns_entries_keep_their_protocol() -> None:
    """trtllm+dns:///NAME:PORT resolves to trtllm:// workers, one per address."""
    found = await resolve_workers(("trtllm+dns:///localhost:50051", "sglang://10.0.0.7:30000"))
    assert "trtllm://127.0.0.1:50051" in found
    assert "sglang://10.0.0.7:30000" == found[-1]
