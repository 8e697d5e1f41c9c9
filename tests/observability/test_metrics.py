"""The metrics endpoint after turns of every ending: each metric with the right values."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenwire.auth.keys import make_principal
from tokenwire.backend import Chunk, GenerateRequest
from tokenwire.config import Config
from tokenwire.metrics.config import MetricsConfig
from tokenwire.moderation import ModerationConfig
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc
from tokenwire.quotas import PlanLimits, QuotaConfig
from tokenwire.router.config import RouterConfig
from tokenwire.server import TokenwireServer
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import (
    FakeBackend,
    RunningServer,
    config_for_tests,
    running_server,
    running_worker,
)

FLAGGED_INPUT = "Listen: I w1ll K.I.L.L you tomorrow."
VILLAIN = "Sure. Here it is: I will kill you now, said the villain."


class ScriptedBackend(FakeBackend):
    """A fake engine whose reply depends on the message (turns run one at a time)."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        prompt = bytes(request.prompt_token_ids).decode(errors="ignore")
        self.fail_after = 3 if "break down" in prompt else None
        self.endless = "go on" in prompt
        self.reply = (VILLAIN if "villain" in prompt else "Fine, thanks.").encode()
        return super().generate(request)


def metrics_config(requests_per_minute: int) -> Config:
    base = config_for_tests()
    return config_for_tests(
        server=dataclasses.replace(base.server, grace_period_s=5.0),
        auth=dataclasses.replace(base.auth, enabled=True, api_keys=True, bootstrap_admin_key=False),
        quotas=QuotaConfig(
            plans={"p": PlanLimits(requests_per_minute=requests_per_minute)}, default_plan="p"
        ),
        moderation=ModerationConfig(enabled=True, moderator="rules", input=True, output=True),
        metrics=MetricsConfig(enabled=True, listen="127.0.0.1:0"),
    )


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def complete(
    running: RunningServer, key: str, message: str, max_tokens: int = 0
) -> list[chat_pb2.CompleteResponse]:
    request = chat_pb2.CompleteRequest(
        message=message, params=chat_pb2.SamplingParams(max_tokens=max_tokens)
    )
    metadata = (("authorization", f"Bearer {key}"),)
    return [e async for e in running.chat.Complete(request, metadata=metadata)]


async def test_every_ending_is_counted_with_its_tokens_and_timings() -> None:
    """Finished, length, cancelled, refused (input and quota), filtered and failed turns."""
    fake = ScriptedBackend(token_delay_s=0.002)
    async with running_server(fake, metrics_config(requests_per_minute=6)) as running:
        auth = running.server.pipeline.auth
        assert auth is not None
        key = (await auth.key_store.create_key(make_principal("acme", "ann"))).secret
        usage: list[chat_pb2.Usage] = []
        for message, max_tokens in (("Hello there", 0), ("go on please", 5)):
            events = await complete(running, key, message, max_tokens)
            usage.append(events[-1].finished.usage)
        filtered = await complete(running, key, "tell me about the villain")
        usage.append(filtered[-1].finished.usage)
        with pytest.raises(grpc.aio.AioRpcError):
            await complete(running, key, "break down now")
        with pytest.raises(grpc.aio.AioRpcError) as input_refused:
            await complete(running, key, FLAGGED_INPUT)
        # Cancelled: the client leaves mid-answer.
        call = running.chat.Complete(
            chat_pb2.CompleteRequest(message="go on please"),
            metadata=(("authorization", f"Bearer {key}"),),
        )
        async for event in call:
            if event.HasField("delta"):
                break
        call.cancel()
        for _ in range(500):
            if not fake.running and not running.server._chat.turns.active:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as over_quota:  # the 7th request
            await complete(running, key, "Hello there")
        with pytest.raises(grpc.aio.AioRpcError) as over_quota_again:
            await complete(running, key, "Hello there")
        endpoint = running.server.metrics_endpoint
        assert endpoint is not None
        endpoint.refresh()
        samples = await asyncio.to_thread(scrape, endpoint.port)
    assert grpc.StatusCode.INVALID_ARGUMENT == input_refused.value.code()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED == over_quota.value.code()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED == over_quota_again.value.code()

    def turns(ending: str) -> float:
        labels = (("ending", ending), ("model", "fake"), ("tenant", "acme"))
        return samples.get(("tokenwire_turns_total", labels), 0.0)

    endings = ("stop", "length", "content_filter", "error", "refused", "cancelled")
    # Refused: the flagged message and both turns over the request quota.
    assert {"stop": 1, "length": 1, "content_filter": 1, "error": 1, "refused": 3,
            "cancelled": 1} == {e: turns(e) for e in endings}  # fmt: skip
    tenant = (("model", "fake"), ("tenant", "acme"))
    completion = samples[("tokenwire_completion_tokens_total", tenant)]
    assert sum(u.completion_tokens for u in usage) + 3 <= completion  # + failed, cancelled
    assert samples[("tokenwire_prompt_tokens_total", tenant)] >= sum(u.prompt_tokens for u in usage)
    ttft_count = samples[("tokenwire_time_to_first_token_seconds_count", (("model", "fake"),))]
    assert 5.0 == ttft_count  # every turn that sent text: stop, length, filtered, failed, cancelled
    assert (
        1.0
        == samples[
            (
                "tokenwire_moderation_blocks_total",
                (("category", "violence"), ("direction", "input")),
            )
        ]
    )
    assert (
        1.0
        == samples[
            (
                "tokenwire_moderation_blocks_total",
                (("category", "violence"), ("direction", "output")),
            )
        ]
    )
    assert (
        2.0
        == samples[
            (
                "tokenwire_quota_refusals_total",
                (("quota", "requests_per_minute"), ("tenant", "acme")),
            )
        ]
    )
    complete_method = "/tokenwire.v1.ChatService/Complete"
    assert 0.0 == samples[("tokenwire_active_streams", (("method", complete_method),))]
    assert 0.0 == samples[("tokenwire_engine_running_requests", (("worker", "local"),))]


async def test_router_and_worker_metrics() -> None:
    """Through a worker: the gateway counts decisions and shows the worker's load, the
    worker counts its requests, and a call without credentials is a refusal by status."""
    worker_config = config_for_tests(metrics=MetricsConfig(enabled=True, listen="127.0.0.1:0"))
    async with running_worker(FakeBackend(reply="Routed."), worker_config) as worker:
        base = config_for_tests()
        config = config_for_tests(
            auth=dataclasses.replace(
                base.auth, enabled=True, api_keys=True, bootstrap_admin_key=False
            ),
            router=RouterConfig(workers=worker.address, poll_interval_s=0.02),
            metrics=MetricsConfig(enabled=True, listen="127.0.0.1:0"),
        )
        server = TokenwireServer(config, store=SQLiteConversationStore(":memory:"))
        await server.start()
        try:
            auth = server.pipeline.auth
            assert auth is not None
            key = (await auth.key_store.create_key(make_principal("acme", "ann"))).secret
            async with grpc.aio.insecure_channel(server.address) as channel:
                chat = chat_pb2_grpc.ChatServiceStub(channel)
                request = chat_pb2.CompleteRequest(message="Hi")
                metadata = (("authorization", f"Bearer {key}"),)
                for _ in range(3):
                    [e async for e in chat.Complete(request, metadata=metadata)]
                with pytest.raises(grpc.aio.AioRpcError):
                    [e async for e in chat.Complete(request)]
            assert server.metrics_endpoint is not None
            server.metrics_endpoint.refresh()
            gateway = await asyncio.to_thread(scrape, server.metrics_endpoint.port)
        finally:
            await server.stop(0)
        assert worker.metrics_endpoint is not None
        served = await asyncio.to_thread(scrape, worker.metrics_endpoint.port)
    at = (("worker", worker.address),)
    assert 3.0 == gateway[("tokenwire_router_decisions_total", at)]
    assert ("tokenwire_engine_kv_cache_usage", at) in gateway
    refusal = (
        ("code", "UNAUTHENTICATED"),
        ("method", "/tokenwire.v1.ChatService/Complete"),
        ("quota", ""),
    )
    assert 1.0 == gateway[("tokenwire_refusals_total", refusal)]
    assert 3.0 == served[("tokenwire_worker_requests_total", (("finish_reason", "stop"),))]
    assert ("tokenwire_engine_running_requests", (("worker", "local"),)) in served
