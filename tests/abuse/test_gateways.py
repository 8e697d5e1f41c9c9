"""Two `tokenwire serve` processes share one Redis: a principal over the flag threshold
is throttled, then suspended, on both gateways.

Each gateway is its own process (``tokenwire serve --backend fake``, the fake engine),
with the pipeline its configuration declares: abuse signals in Redis (the store
quotas.store names), flag events and conversations in PostgreSQL, API keys in one
shared key database. Flagged messages alternate between the gateways; each waits out
the other's standing cache (``abuse.standing_cache_s``) before its call.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.abuse.conftest import FLAGGED, complete, outcome
from tests.auth.conftest import bearer
from tests.conftest import POSTGRES_DSN, REDIS_URL, redis_key_prefix, spawn_server
from tests.stores.conftest import drop_schema, fresh_schema
from tokenwire.auth import SQLiteKeyStore, make_principal
from tokenwire.proto.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    chat_pb2_grpc,
    conversations_pb2,
    conversations_pb2_grpc,
)

CACHE_S = 0.2
STEP_S = CACHE_S * 1.5  # a gateway's cached standing is stale after this
FILTERED = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DENIED = grpc.StatusCode.PERMISSION_DENIED
OK = grpc.StatusCode.OK


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A PostgreSQL schema of this test's own, dropped afterwards."""
    name = fresh_schema()
    try:
        yield name
    finally:
        await drop_schema(name)


async def test_a_principal_over_the_flag_threshold_is_throttled_then_suspended_on_two_gateways(
    tmp_path: Path, schema: str, redis_url: str
) -> None:
    """Flags alternate between two gateway processes: after 3, alice's turns are held to
    2 per 4 s on both (RESOURCE_EXHAUSTED with RetryInfo from either); the sixth suspends
    her on both (PERMISSION_DENIED with the reason, for chat and conversations alike);
    the events are listed without their text; LiftSuspension on one restores both; bob
    is served throughout."""
    keys = SQLiteKeyStore(tmp_path / "keys.db")
    await keys.open()
    alice = await keys.create_key(make_principal("acme", "alice"))
    bob = await keys.create_key(make_principal("acme", "bob"))
    admin = await keys.create_key(make_principal("ops", "root", roles=["admin"]))
    await keys.close()
    async with redis_key_prefix("abuse") as prefix:
        settings = (
            f"store.data_dir={tmp_path}",
            f"auth.keys_db={tmp_path / 'keys.db'}",
            "auth.bootstrap_admin_key=false",
            "store.backend=postgres",
            f"store.postgres_dsn={POSTGRES_DSN}",
            f"store.postgres_schema={schema}",
            # abuse.store, redis_url and key_prefix are empty: they follow the quotas'.
            "quotas.store=redis",
            f"quotas.redis_url={REDIS_URL}",
            f"quotas.key_prefix={prefix}",
            "abuse.throttle_after=3",
            "abuse.throttle_turns_per_minute=2",
            "abuse.throttle_window_s=4",
            "abuse.suspend_after=6",
            f"abuse.standing_cache_s={CACHE_S}",
            "moderation.moderator=rules",
        )
        gateways = [await spawn_server(*settings) for _ in range(2)]
        channels = [grpc.aio.insecure_channel(address) for _, address in gateways]
        try:
            chats = [chat_pb2_grpc.ChatServiceStub(channel) for channel in channels]
            conversations = [
                conversations_pb2_grpc.ConversationServiceStub(channel) for channel in channels
            ]
            admins = [admin_pb2_grpc.AdminServiceStub(channel) for channel in channels]
            as_admin = bearer(admin.secret)

            async def turn(index: int, message: str = FLAGGED) -> grpc.StatusCode:
                await asyncio.sleep(STEP_S)
                return (await complete(chats[index % 2], alice, message)).code

            flagged = [await turn(i) for i in range(5)]  # 3 throttle; the throttle lets 2 by
            throttled = [await complete(chats[i], alice, "Hello") for i in (1, 0)]
            bob_served = [(await complete(chat, bob, "Hello")).code for chat in chats]
            await asyncio.sleep(max(t.retry_after_s or 0.0 for t in throttled) + 0.05)
            sixth = (await complete(chats[1], alice, FLAGGED)).code
            await asyncio.sleep(STEP_S)
            suspended = [await complete(chat, alice, "Hello") for chat in chats]
            listing = [
                await outcome(
                    lambda stub=stub: stub.ListConversations(
                        conversations_pb2.ListConversationsRequest(), metadata=bearer(alice.secret)
                    )
                )
                for stub in conversations
            ]
            events = await admins[1].ListFlaggedEvents(
                admin_pb2.ListFlaggedEventsRequest(tenant="acme", user="alice"), metadata=as_admin
            )
            standing = await admins[0].GetAccountStanding(
                admin_pb2.GetAccountStandingRequest(tenant="acme", user="alice"),
                metadata=as_admin,
            )
            await admins[0].LiftSuspension(
                admin_pb2.LiftSuspensionRequest(tenant="acme", user="alice"), metadata=as_admin
            )
            await asyncio.sleep(STEP_S)
            restored = [(await complete(chat, alice, "Hello")).code for chat in chats]
        finally:
            for channel in channels:
                await channel.close()
            for process, _ in gateways:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(process.wait(), 30)
    assert [FILTERED] * 5 == flagged
    assert [EXHAUSTED, EXHAUSTED] == [t.code for t in throttled]
    assert all(t.retry_after_s is not None and 0 < t.retry_after_s <= 2 for t in throttled)
    assert [OK, OK] == bob_served
    assert FILTERED == sixth
    assert [DENIED, DENIED] == [s.code for s in suspended]
    reason = "suspended for repeated policy violations: 6 flagged messages within 3600s"
    assert all(s.message.startswith(reason) for s in suspended)
    assert all(s.message.endswith("contact your administrator") for s in suspended)
    assert [DENIED, DENIED] == [o.code for o in listing]
    assert 6 == len(events.events)
    assert {("input", "violence", "block", "")} == {
        (e.direction, e.category, e.action, e.text) for e in events.events
    }
    state = standing.standing
    assert (6, True) == (state.flags_in_window, state.suspended)
    assert [OK, OK] == restored
