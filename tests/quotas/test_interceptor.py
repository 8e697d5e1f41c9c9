"""QuotaInterceptor on the echo service: requests and stream slots on every RPC shape."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.quotas.conftest import (
    REDIS_URL,
    as_principal,
    eventually,
    quota_chain,
    refused,
)
from tokenwire.errors import ConfigError, PermissionDeniedError
from tokenwire.interceptors.base import CallInfo, Interceptor, Proceed
from tokenwire.quotas import PlanLimits, QuotaConfig, QuotaStore, Rate, Slot
from tokenwire.quotas.interceptor import QuotaInterceptor
from tokenwire.quotas.redis import RedisQuotaStore
from tokenwire.testing.echo import echo_pb2, running_echo_server

Request = echo_pb2.EchoRequest
ALICE = as_principal("acme", "alice")
BOB = as_principal("acme", "bob")
CAROL = as_principal("globex", "carol")
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def quotas(window_s: float = 60.0, tenant: PlanLimits | None = None, **limits: int) -> QuotaConfig:
    """One 'default' plan with ``limits`` (and an optional tenant-wide plan)."""
    plans = {"default": PlanLimits(**limits)}
    if tenant is not None:
        plans["tenant"] = tenant
    return QuotaConfig(
        window_s=window_s, plans=plans, tenant_default_plan="tenant" if tenant else ""
    )


async def texts(*items: str) -> AsyncIterator[echo_pb2.EchoRequest]:
    for text in items:
        yield Request(text=text)


async def test_unary_requests_are_refused_with_retry_info_then_recover(store: QuotaStore) -> None:
    """Over requests_per_minute: RESOURCE_EXHAUSTED, RetryInfo, QuotaFailure; admitted after it."""
    config = quotas(window_s=1.0, requests_per_minute=2)  # one request refills every 0.5 s
    async with running_echo_server(quota_chain(config, store)) as echo:
        for _ in range(2):
            await echo.stub.Unary(Request(text="hi"), metadata=ALICE)
        refusal = await refused(echo.stub.Unary(Request(text="hi"), metadata=ALICE))
        assert EXHAUSTED == refusal.code
        assert [("principal:acme/alice", "requests_per_minute")] == refusal.violations
        assert refusal.retry_after_s is not None
        assert 0.4 < refusal.retry_after_s <= 0.5
        assert "retry in" in refusal.message
        await asyncio.sleep(refusal.retry_after_s)
        assert "hi" == (await echo.stub.Unary(Request(text="hi"), metadata=ALICE)).text
        assert 3 == echo.servicer.calls


async def test_requests_are_counted_on_every_shape(store: QuotaStore) -> None:
    """Each call of any shape counts one request, however many messages it carries."""
    config = quotas(requests_per_minute=4)
    async with running_echo_server(quota_chain(config, store)) as echo:
        await echo.stub.Unary(Request(text="u"), metadata=ALICE)
        _ = [r async for r in echo.stub.ServerStream(Request(text="s", count=3), metadata=ALICE)]
        await echo.stub.ClientStream(texts("a", "b", "c"), metadata=ALICE)
        _ = [r async for r in echo.stub.Bidi(texts("a", "b", "c"), metadata=ALICE)]
        refusal = await refused(echo.stub.Unary(Request(text="u"), metadata=ALICE))
    assert EXHAUSTED == refusal.code
    rate = Rate("{acme}:u:alice:rpm", 4, 60.0)
    assert 4 == round(await store.used(rate))


async def test_a_tenant_limit_is_shared_by_its_users(store: QuotaStore) -> None:
    """Two users of one tenant share its budget; another tenant is not affected."""
    config = quotas(requests_per_minute=10, tenant=PlanLimits(requests_per_minute=3))
    async with running_echo_server(quota_chain(config, store)) as echo:
        for who in (ALICE, ALICE, BOB):
            await echo.stub.Unary(Request(text="x"), metadata=who)
        refusal = await refused(echo.stub.Unary(Request(text="x"), metadata=BOB))
        assert [("tenant:acme", "requests_per_minute")] == refusal.violations
        # 3 a minute, all 3 spent just now: the next one frees in about 60 s / 3.
        assert refusal.retry_after_s == pytest.approx(20.0, abs=1.0)
        assert "x" == (await echo.stub.Unary(Request(text="x"), metadata=CAROL)).text
        # The refusal charged neither bob nor alice: their own budgets show their calls only.
        assert 1 == round(await store.used(Rate("{acme}:u:bob:rpm", 10, 60.0)))


@pytest.mark.parametrize("shape", ["ServerStream", "Bidi"])
async def test_concurrent_streams_are_refused_then_freed_by_a_client_cancel(
    store: QuotaStore, shape: str
) -> None:
    """A second stream is refused while one is open; cancelling the first admits a new one."""
    config = quotas(concurrent_streams=1)
    slot = Slot("{acme}:u:alice:streams", 1)
    async with running_echo_server(quota_chain(config, store)) as echo:

        def open_stream() -> Any:
            if shape == "ServerStream":
                return echo.stub.ServerStream(Request(text="s", count=10**6), metadata=ALICE)
            call = echo.stub.Bidi(metadata=ALICE)
            return call

        first = open_stream()
        if shape == "Bidi":
            await first.write(Request(text="b"))
        assert (await first.read()).text in ("s", "b")
        second = open_stream()
        refusal = await refused(second.read())
        assert EXHAUSTED == refusal.code
        assert [("principal:acme/alice", "concurrent_streams")] == refusal.violations
        assert 1.0 == refusal.retry_after_s
        first.cancel()
        assert 0 == await eventually(lambda: store.in_use(slot), 0)
        third = open_stream()
        if shape == "Bidi":
            await third.write(Request(text="b"))
            await third.done_writing()
        assert (await third.read()).text in ("s", "b")
        third.cancel()
        assert 0 == await eventually(lambda: store.in_use(slot), 0)


async def test_a_stream_that_ends_frees_its_slot_before_its_status(store: QuotaStore) -> None:
    """Once a client sees a stream end OK, its next stream is admitted at once."""
    config = quotas(concurrent_streams=1)
    async with running_echo_server(quota_chain(config, store)) as echo:
        for _ in range(5):
            assert 3 == len([r async for r in echo.stub.Bidi(texts("a", "b", "c"), metadata=ALICE)])
            assert 2 == len(
                [r async for r in echo.stub.ServerStream(Request(count=2), metadata=ALICE)]
            )
            assert 2 == (await echo.stub.ClientStream(texts("a", "b"), metadata=ALICE)).index


@pytest.mark.parametrize("shape", ["ServerStream", "Bidi"])
async def test_a_stream_that_fails_or_times_out_frees_its_slot(
    store: QuotaStore, shape: str
) -> None:
    """A handler error mid-stream and a deadline both give the slot back."""
    config = quotas(concurrent_streams=1)
    slot = Slot("{acme}:u:alice:streams", 1)
    async with running_echo_server(quota_chain(config, store)) as echo:
        if shape == "ServerStream":
            failing: Any = echo.stub.ServerStream(
                Request(text="x", count=5, fail_after=2), metadata=ALICE
            )
        else:
            failing = echo.stub.Bidi(_requests_failing_after(2), metadata=ALICE)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            _ = [r async for r in failing]
        assert grpc.StatusCode.INTERNAL == raised.value.code()
        assert 0 == await store.in_use(slot)
        slow: Any = (
            echo.stub.ServerStream(Request(count=10**6), metadata=ALICE, timeout=0.3)
            if shape == "ServerStream"
            else echo.stub.Bidi(metadata=ALICE, timeout=0.3)
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _read_slowly(slow)
        assert grpc.StatusCode.DEADLINE_EXCEEDED == raised.value.code()
        assert 0 == await eventually(lambda: store.in_use(slot), 0)


async def _read_slowly(call: Any) -> None:
    while True:
        await asyncio.sleep(0.05)
        await call.read()


async def _requests_failing_after(count: int) -> AsyncIterator[echo_pb2.EchoRequest]:
    for _ in range(count + 1):
        yield Request(text="x", fail_after=count)


class _Deny(Interceptor):
    """Refuses every call after quotas admitted it."""

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        raise PermissionDeniedError("no")


async def test_a_call_refused_after_admission_frees_its_slot(store: QuotaStore) -> None:
    """A stream refused before its handler ran, or by the request limit, holds no slot."""
    slot = Slot("{acme}:u:alice:streams", 1)
    async with running_echo_server(
        quota_chain(quotas(concurrent_streams=1), store, _Deny())
    ) as echo:
        refusal = await refused(echo.stub.Bidi(texts("a"), metadata=ALICE).read())
        assert grpc.StatusCode.PERMISSION_DENIED == refusal.code
        assert 0 == await store.in_use(slot)
    config = quotas(concurrent_streams=1, requests_per_minute=1)
    async with running_echo_server(quota_chain(config, store)) as echo:
        _ = [r async for r in echo.stub.ServerStream(Request(count=1), metadata=ALICE)]
        refusal = await refused(echo.stub.ServerStream(Request(count=1), metadata=ALICE).read())
        assert [("principal:acme/alice", "requests_per_minute")] == refusal.violations
        assert 0 == await store.in_use(slot)


async def test_unlimited_plans_touch_no_counter(store: QuotaStore) -> None:
    """Principals on an unlimited plan pass without a single store operation."""
    config = QuotaConfig(plans={"default": PlanLimits(requests_per_minute=1), "free": PlanLimits()})
    async with running_echo_server(quota_chain(config, store)) as echo:
        vip = as_principal("acme", "vip", "free")
        for _ in range(5):
            await echo.stub.Unary(Request(text="x"), metadata=vip)
    assert 0 == round(await store.used(Rate("{acme}:u:vip:rpm", 1, 60.0)))


async def test_an_unreachable_store_refuses_unless_configured_to_fail_open() -> None:
    """Quotas that cannot be checked: UNAVAILABLE with a retry delay, or admitted when fail_open."""
    down = RedisQuotaStore("redis://127.0.0.1:1/0", timeout_s=0.2)
    try:
        async with running_echo_server(quota_chain(quotas(requests_per_minute=5), down)) as echo:
            refusal = await refused(echo.stub.Unary(Request(text="x"), metadata=ALICE))
        assert grpc.StatusCode.UNAVAILABLE == refusal.code
        assert 1.0 == refusal.retry_after_s
        config = QuotaConfig(plans={"default": "rpm:5 streams:1"}, fail_open=True)
        async with running_echo_server(quota_chain(config, down)) as echo:
            assert "x" == (await echo.stub.Unary(Request(text="x"), metadata=ALICE)).text
            assert 1 == len([r async for r in echo.stub.Bidi(texts("a"), metadata=ALICE)])
    finally:
        await down.close()


async def test_the_interceptor_owns_the_store_its_config_names(redis_prefix: str) -> None:
    """Without a store argument the interceptor builds, starts and closes the configured one."""
    config = QuotaConfig(store="redis", redis_url=REDIS_URL, key_prefix=redis_prefix)
    interceptor = QuotaInterceptor(config)
    assert isinstance(interceptor.store, RedisQuotaStore)
    await interceptor.start()
    await interceptor.close()


async def test_an_unreachable_store_at_start_up_is_a_config_error() -> None:
    """A server must not start counting on a Redis it cannot reach (unless fail_open)."""
    config = QuotaConfig(store="redis", redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2)
    refusing = QuotaInterceptor(config)
    with pytest.raises(ConfigError, match="fail_open"):
        await refusing.start()
    await refusing.close()
    tolerant = QuotaInterceptor(dataclasses.replace(config, fail_open=True))
    await tolerant.start()
    await tolerant.close()


async def test_disabled_quotas_count_nothing_and_need_no_store(store: QuotaStore) -> None:
    """enabled = false admits every call uncounted, and starts without its store."""
    config = dataclasses.replace(quotas(requests_per_minute=1), enabled=False)
    async with running_echo_server(quota_chain(config, store)) as echo:
        for _ in range(3):
            await echo.stub.Unary(Request(text="x"), metadata=ALICE)
    assert 0 == round(await store.used(Rate("{acme}:u:alice:rpm", 1, 60.0)))
    unreachable = dataclasses.replace(config, store="redis", redis_url="redis://127.0.0.1:1/0")
    interceptor = QuotaInterceptor(unreachable)
    await interceptor.start()
    await interceptor.close()
