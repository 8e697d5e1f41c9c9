"""Usage test kit: budget stores, API keys, and a real server that records usage.

``budget_store`` runs a test once per store: in memory, and in the Redis server
on 127.0.0.1:6379 (or ``TOKENWIRE_TEST_REDIS_URL``) under a key prefix of its
own, deleted afterwards; Redis is required when ``TOKENWIRE_TEST_REQUIRE_SERVICES``
is set (see ``tests/conftest.py``). :func:`usage_server` starts the chat server
with API keys on, the usage policy in its turn policies and an AdminService
stub that answers GetUsage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.auth.conftest import auth_config, bearer
from tests.conftest import REDIS_URL, redis_key_prefix
from tokenwire.auth import IssuedKey, SQLiteKeyStore, make_principal
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.auth.policy import CredentialPolicy
from tokenwire.backend import Backend
from tokenwire.interceptors import ErrorsInterceptor
from tokenwire.proto.v1 import admin_pb2_grpc, chat_pb2
from tokenwire.quotas import MemoryQuotaStore
from tokenwire.quotas.redis import RedisQuotaStore
from tokenwire.quotas.store import BudgetStore
from tokenwire.stores import ConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server
from tokenwire.turns.policy import TurnPolicy
from tokenwire.usage import UsageConfig
from tokenwire.usage.budgets import TenantBudgets
from tokenwire.usage.policy import UsagePolicy

BUDGET_STORES = ["memory", "redis"]


@pytest.fixture(params=BUDGET_STORES)
async def budget_store(request: pytest.FixtureRequest) -> AsyncIterator[BudgetStore]:
    """Each budget store, started; Redis under a key prefix of this test's own."""
    if request.param == "memory":
        memory = MemoryQuotaStore()
        yield memory
        await memory.close()
        return
    async with redis_key_prefix("usage") as prefix:
        shared = RedisQuotaStore(REDIS_URL, key_prefix=prefix)
        await shared.start()
        try:
            yield shared
        finally:
            await shared.close()


@pytest.fixture
async def key_store(tmp_path: Path) -> AsyncIterator[SQLiteKeyStore]:
    """An open API key store in the test's tmp dir."""
    store = SQLiteKeyStore(tmp_path / "keys.db")
    await store.open()
    yield store
    await store.close()


@dataclass(frozen=True)
class Keys:
    """Callers of two tenants, and an admin."""

    alice: IssuedKey  # acme/alice
    bob: IssuedKey  # acme/bob
    carol: IssuedKey  # globex/carol
    admin: IssuedKey  # ops/root, role admin


@pytest.fixture
async def keys(key_store: SQLiteKeyStore) -> Keys:
    """API keys for acme's alice and bob, globex's carol, and an admin."""
    return Keys(
        await key_store.create_key(make_principal("acme", "alice")),
        await key_store.create_key(make_principal("acme", "bob")),
        await key_store.create_key(make_principal("globex", "carol")),
        await key_store.create_key(make_principal("ops", "root", roles=["admin"])),
    )


@dataclass(frozen=True)
class UsageServer:
    """A running server that records usage, its store and policy, and an admin stub."""

    running: RunningServer
    store: ConversationStore
    policy: UsagePolicy
    admin: admin_pb2_grpc.AdminServiceStub


@asynccontextmanager
async def usage_server(
    key_store: SQLiteKeyStore,
    store: ConversationStore,
    *,
    usage: UsageConfig | None = None,
    budget_store: BudgetStore | None = None,
    backend: Backend | None = None,
    policies: Sequence[TurnPolicy] = (),
    later: Sequence[TurnPolicy] = (),
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[UsageServer]:
    """The chat server with API keys on and, per turn: credentials, ``policies``, usage,
    then ``later`` (where moderation goes).

    Budgets (``usage.tenant_budgets``) are kept in ``budget_store`` (memory if None).
    """
    config = config_for_tests(auth=auth_config())
    usage = usage or UsageConfig()
    config = dataclasses.replace(config, usage=usage)
    auth = AuthInterceptor(config.auth, "", key_store=key_store)
    budgets = None
    if usage.tenant_budgets:
        budgets = TenantBudgets(usage, budget_store or MemoryQuotaStore())
    extra = {"clock": clock} if clock is not None else {}
    policy = UsagePolicy(usage, store, budgets=budgets, keys=auth.key_store, **extra)
    async with running_server(
        backend or FakeBackend(reply="Hi!"),
        config,
        store=store,
        interceptors=[ErrorsInterceptor(), auth],
        policies=[CredentialPolicy(auth), *policies, policy, *later],
    ) as running:
        yield UsageServer(running, store, policy, admin_pb2_grpc.AdminServiceStub(running.channel))


async def complete(
    running: RunningServer, key: IssuedKey, message: str = "Hello", max_tokens: int = 0
) -> chat_pb2.Usage:
    """One Complete turn as ``key``'s caller; the usage its TurnFinished reported."""
    request = chat_pb2.CompleteRequest(
        message=message, params=chat_pb2.SamplingParams(max_tokens=max_tokens)
    )
    events = [e async for e in running.chat.Complete(request, metadata=bearer(key.secret))]
    finished = events[-1]
    assert finished.HasField("finished")
    return finished.finished.usage


@dataclass(frozen=True)
class Refusal:
    """A call's error status and its google.rpc details."""

    code: grpc.StatusCode
    message: str
    retry_after_s: float | None
    quota_failure: error_details_pb2.QuotaFailure | None


def refusal_of(error: grpc.aio.AioRpcError) -> Refusal:
    """The status and rich details of ``error``."""
    retry: float | None = None
    failure: error_details_pb2.QuotaFailure | None = None
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)  # type: ignore[arg-type]
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry = info.retry_delay.ToTimedelta().total_seconds()
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                failure = error_details_pb2.QuotaFailure()
                detail.Unpack(failure)
    return Refusal(error.code(), error.details() or "", retry, failure)


async def refused_complete(
    running: RunningServer, key: IssuedKey, message: str = "Hello", max_tokens: int = 0
) -> Refusal:
    """A Complete turn that must fail; how it was refused."""
    try:
        await complete(running, key, message, max_tokens)
    except grpc.aio.AioRpcError as error:
        return refusal_of(error)
    raise AssertionError("the turn was not refused")
