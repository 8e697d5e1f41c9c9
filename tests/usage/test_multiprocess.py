"""Two `tokenwire serve` processes share one tenant budget in Redis and one usage table."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.auth.conftest import bearer
from tests.conftest import POSTGRES_DSN, REDIS_URL, redis_key_prefix, spawn_server
from tests.stores.conftest import drop_schema, fresh_schema
from tests.usage.conftest import Keys, complete, usage_server
from tests.usage.test_server import TENANT, rows, usage_request
from tokenwire.auth import SQLiteKeyStore
from tokenwire.proto.v1 import admin_pb2_grpc, chat_pb2, chat_pb2_grpc
from tokenwire.stores import SQLiteConversationStore
from tokenwire.testing import FakeBackend

MAX_TOKENS = 20
TURNS_THAT_FIT = 3


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A PostgreSQL schema of this test's own, dropped afterwards."""
    name = fresh_schema()
    try:
        yield name
    finally:
        await drop_schema(name)


async def _outcome(stub: chat_pb2_grpc.ChatServiceStub, secret: str) -> grpc.StatusCode:
    request = chat_pb2.CompleteRequest(
        message="Hello", params=chat_pb2.SamplingParams(max_tokens=MAX_TOKENS)
    )
    try:
        async for _ in stub.Complete(request, metadata=bearer(secret)):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_two_gateways_share_one_budget_and_one_usage_table(
    key_store: SQLiteKeyStore, keys: Keys, tmp_path: Path, schema: str
) -> None:
    """Twelve turns at once over two gateway processes against a budget with room for
    exactly three: three pass, nine are RESOURCE_EXHAUSTED, and either gateway reports
    exactly the three turns' tokens."""
    # Every turn uses exactly prompt + max_tokens (an endless reply), so settling
    # changes nothing and the count is exact however the turns interleave.
    async with usage_server(
        key_store, SQLiteConversationStore(":memory:"), backend=FakeBackend(endless=True)
    ) as probe:
        prompt = (await complete(probe.running, keys.alice, "Hello", MAX_TOKENS)).prompt_tokens
    per_turn = prompt + MAX_TOKENS
    budget = TURNS_THAT_FIT * per_turn + per_turn - 1
    async with redis_key_prefix("usage") as prefix:
        settings = (
            "backend.options=endless=true",
            f"auth.keys_db={tmp_path / 'keys.db'}",
            "auth.bootstrap_admin_key=false",
            "store.backend=postgres",
            f"store.postgres_dsn={POSTGRES_DSN}",
            f"store.postgres_schema={schema}",
            "quotas.store=redis",
            f"quotas.redis_url={REDIS_URL}",
            f"quotas.key_prefix={prefix}",
            f"usage.tenant_budgets=acme={budget}",
        )
        gateways = [await spawn_server(*settings) for _ in range(2)]
        try:
            channels = [grpc.aio.insecure_channel(address) for _, address in gateways]
            stubs = [chat_pb2_grpc.ChatServiceStub(channel) for channel in channels]
            secrets = [keys.alice.secret, keys.bob.secret]
            codes = await asyncio.gather(
                *(_outcome(stubs[i % 2], secrets[i // 2 % 2]) for i in range(12))
            )
            admin = admin_pb2_grpc.AdminServiceStub(channels[1])
            report = await admin.GetUsage(usage_request(TENANT), metadata=bearer(keys.admin.secret))
            for channel in channels:
                await channel.close()
        finally:
            for process, _ in gateways:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(process.wait(), 30)
    assert TURNS_THAT_FIT == codes.count(grpc.StatusCode.OK)
    assert 12 - TURNS_THAT_FIT == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    turns = TURNS_THAT_FIT
    assert [("acme", turns, turns * prompt, turns * MAX_TOKENS)] == [r[:4] for r in rows(report)]
