"""Tracing on: one trace spans the gateway's turn, the router, the worker and its engine."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokenwire.errors import ConfigError
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc
from tokenwire.router.config import RouterConfig
from tokenwire.server import TokenwireServer
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import FakeBackend, config_for_tests, running_server
from tokenwire.tracing.config import TracingConfig
from tokenwire.tracing.spans import Tracing
from tokenwire.turns.policy import TurnInfo, TurnOutcome
from tokenwire.worker.config import WorkerConfig
from tokenwire.worker.server import WorkerServer

ON = TracingConfig(enabled=True)


class LogContext:
    """A turn policy that reads what every log line of the turn is bound with."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []

    async def before_turn(self, turn: TurnInfo) -> None:
        self.seen.append(structlog.contextvars.get_contextvars())

    def output_filter(self, turn: TurnInfo) -> None:
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        return None


async def test_one_trace_spans_gateway_router_worker_and_engine() -> None:
    """The turn's span is the root; route, worker and engine spans are its descendants."""
    exported = InMemorySpanExporter()
    worker_config = dataclasses.replace(
        config_for_tests(tracing=ON), worker=WorkerConfig(listen="127.0.0.1:0")
    )
    worker = WorkerServer(
        worker_config,
        engine=FakeBackend(reply="Traced."),
        tracing=Tracing(dataclasses.replace(ON, service_name="worker"), exporter=exported),
    )
    await worker.start()
    try:
        config = config_for_tests(
            router=RouterConfig(workers=worker.address, poll_interval_s=0.02), tracing=ON
        )
        log_context = LogContext()
        server = TokenwireServer(
            config,
            policies=[log_context],
            store=SQLiteConversationStore(":memory:"),
            tracing=Tracing(dataclasses.replace(ON, service_name="gateway"), exporter=exported),
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                chat = chat_pb2_grpc.ChatServiceStub(channel)
                events = [e async for e in chat.Complete(chat_pb2.CompleteRequest(message="Hi"))]
        finally:
            await server.stop(0)
    finally:
        await worker.stop(0)
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert {"tokenwire.turn", "tokenwire.route", "tokenwire.worker", "tokenwire.engine"} <= set(
        spans
    )
    turn, route = spans["tokenwire.turn"], spans["tokenwire.route"]
    worker_span, engine = spans["tokenwire.worker"], spans["tokenwire.engine"]
    assert 1 == len({s.context.trace_id for s in spans.values()})
    assert turn.parent is None
    assert turn.context.span_id == route.parent.span_id
    assert route.context.span_id == worker_span.parent.span_id
    assert worker_span.context.span_id == engine.parent.span_id
    assert ("gateway", "worker") == (
        turn.resource.attributes["service.name"],
        worker_span.resource.attributes["service.name"],
    )
    assert events[-1].finished.usage.completion_tokens == turn.attributes["turn.completion_tokens"]
    assert worker.address == route.attributes["router.worker"]
    trace_id = f"{turn.context.trace_id:032x}"
    assert [trace_id] == [seen.get("trace_id") for seen in log_context.seen]


async def test_tracing_off_records_nothing() -> None:
    """With tracing off (the default) no span is made and turns are served as always."""
    config = config_for_tests()
    async with running_server(FakeBackend(reply="Plain."), config) as running:
        events = [e async for e in running.chat.Complete(chat_pb2.CompleteRequest(message="Hi"))]
        tracing = running.server.tracing
    assert tracing is None
    assert "Plain." == "".join(e.delta.text for e in events if e.HasField("delta"))


def test_a_bad_sample_ratio_is_refused() -> None:
    """tracing.sample_ratio outside 0..1 is a ConfigError."""
    with pytest.raises(ConfigError, match="sample_ratio"):
        TracingConfig(enabled=True, sample_ratio=1.5)
