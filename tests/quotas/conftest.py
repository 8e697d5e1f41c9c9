"""Quota test kit: every store, a stand-in for authentication, readers for refusals.

The ``store`` fixture runs a test once per store: in memory, and in the Redis
server on 127.0.0.1:6379 (or ``TOKENWIRE_TEST_REDIS_URL``) under a key prefix of
its own, deleted afterwards. When Redis is unreachable the Redis runs skip, except
with ``TOKENWIRE_TEST_REQUIRE_SERVICES`` set (``.ci/run`` sets it), where they
fail: CI must prove the shared store (see ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import REDIS_URL, redis_key_prefix
from tokenwire.auth.principal import Principal
from tokenwire.context import current_call
from tokenwire.interceptors import ErrorsInterceptor
from tokenwire.interceptors.base import CallInfo, Interceptor, Proceed
from tokenwire.quotas import MemoryQuotaStore, QuotaConfig, QuotaStore
from tokenwire.quotas.interceptor import QuotaInterceptor
from tokenwire.quotas.redis import RedisQuotaStore

PRINCIPAL_HEADER = "x-test-principal"
STORES = ["memory", "redis"]
T = TypeVar("T")


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A fresh Redis key prefix (Redis required), its keys deleted after the test."""
    async with redis_key_prefix("quotas") as prefix:
        yield prefix


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    """Each quota store, started; Redis under a key prefix of this test's own."""
    if request.param == "memory":
        memory = MemoryQuotaStore()
        yield memory
        await memory.close()
        return
    async with redis_key_prefix("quotas") as prefix:
        shared = RedisQuotaStore(REDIS_URL, key_prefix=prefix)
        await shared.start()
        try:
            yield shared
        finally:
            await shared.close()


class PrincipalFromMetadata(Interceptor):
    """Stands in for authentication: ``x-test-principal: TENANT/USER[/PLAN]``."""

    authenticates = True

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        for key, value in context.invocation_metadata() or ():
            if key == PRINCIPAL_HEADER and isinstance(value, str):
                tenant, user, *plan = value.split("/")
                current_call().principal = Principal(tenant, user, plan=plan[0] if plan else "")
                break
        else:
            current_call().principal = Principal("default", "anonymous")
        return await proceed(request, context)


def as_principal(
    tenant: str = "acme", user: str = "alice", plan: str = ""
) -> tuple[tuple[str, str]]:
    """Call metadata that makes the caller ``tenant/user`` on ``plan``."""
    value = f"{tenant}/{user}/{plan}" if plan else f"{tenant}/{user}"
    return ((PRINCIPAL_HEADER, value),)


def quota_chain(config: QuotaConfig, store: QuotaStore, *inner: Interceptor) -> list[Interceptor]:
    """The declared order: errors → (authentication) → quotas → ``inner``."""
    return [
        ErrorsInterceptor(),
        PrincipalFromMetadata(),
        QuotaInterceptor(config, store=store),
        *inner,
    ]


@dataclass(frozen=True, slots=True)
class Refusal:
    """What a refused call carried: its code, RetryInfo and QuotaFailure violations."""

    code: grpc.StatusCode
    message: str
    retry_after_s: float | None
    violations: list[tuple[str, str]]  # (subject, description)


def refusal_of(error: grpc.aio.AioRpcError) -> Refusal:
    """Read the rich status details the errors interceptor packed into the trailers."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
    status = status_pb2.Status.FromString(raw if isinstance(raw, bytes) else raw.encode())
    retry_after_s: float | None = None
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        retry, failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
        if detail.Unpack(retry):
            retry_after_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        elif detail.Unpack(failure):
            violations += [(v.subject, v.description) for v in failure.violations]
    return Refusal(error.code(), error.details() or "", retry_after_s, violations)


async def refused(attempt: Awaitable[object]) -> Refusal:
    """Await a call that must fail, and read its refusal."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await attempt
    return refusal_of(raised.value)


async def eventually(probe: Callable[[], Awaitable[T]], expected: T, limit_s: float = 5.0) -> T:
    """Poll ``probe()`` until it returns ``expected``; return the last value either way."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    # Polling: the counters live in a store (Redis) that cannot signal an Event.
    while (value := await probe()) != expected and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return value
