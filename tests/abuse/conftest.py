"""Abuse test kit: every store, API keys, a real server with abuse signals, refusal readers.

``abuse_store`` runs a test once per store: in memory, and in the Redis server on
127.0.0.1:6379 (or ``TOKENWIRE_TEST_REDIS_URL``) under a key prefix of its own,
deleted afterwards; Redis is required when ``TOKENWIRE_TEST_REQUIRE_SERVICES`` is
set (see ``tests/conftest.py``). :func:`abuse_server` starts the chat server as
configured (the pipeline of :mod:`tokenwire.pipeline`, abuse signals included)
with API keys on, and an AdminService stub.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.auth.conftest import bearer
from tests.conftest import REDIS_URL, redis_key_prefix
from tokenwire.abuse import AbuseConfig, AbuseRules, AbuseStore, MemoryAbuseStore
from tokenwire.abuse.redis import RedisAbuseStore
from tokenwire.auth import AuthConfig, IssuedKey, SQLiteKeyStore, make_principal
from tokenwire.moderation import ModerationConfig
from tokenwire.proto.v1 import admin_pb2_grpc, chat_pb2
from tokenwire.stores import SQLiteConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

STORES = ["memory", "redis"]
FLAGGED = "I will kill you"  # the built-in rules flag it as violence
RULES = AbuseRules(window_s=3600.0, throttle_after=3, suspend_after=5, throttle_turns=2)


@asynccontextmanager
async def store_of(kind: str, rules: AbuseRules = RULES) -> AsyncIterator[AbuseStore]:
    """A started store of ``kind`` ("memory" or "redis", under a fresh key prefix)."""
    if kind == "memory":
        yield MemoryAbuseStore(rules)
        return
    async with redis_key_prefix("abuse") as prefix:
        store = RedisAbuseStore(REDIS_URL, rules, key_prefix=prefix)
        await store.start()
        try:
            yield store
        finally:
            await store.close()


@pytest.fixture(params=STORES)
async def abuse_store(request: pytest.FixtureRequest) -> AsyncIterator[AbuseStore]:
    """Each abuse store with :data:`RULES`, started."""
    async with store_of(request.param) as store:
        yield store


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A fresh Redis key prefix (Redis required), its keys deleted after the test."""
    async with redis_key_prefix("abuse") as prefix:
        yield prefix


@dataclass(frozen=True)
class Keys:
    """Callers of two tenants, and an admin; the key database they live in."""

    alice: IssuedKey  # acme/alice
    bob: IssuedKey  # acme/bob
    carol: IssuedKey  # globex/carol
    admin: IssuedKey  # ops/root, role admin
    keys_db: Path


@pytest.fixture
async def keys(tmp_path: Path) -> Keys:
    """API keys in a key database of this test's own."""
    path = tmp_path / "keys.db"
    store = SQLiteKeyStore(path)
    await store.open()
    try:
        return Keys(
            await store.create_key(make_principal("acme", "alice")),
            await store.create_key(make_principal("acme", "bob")),
            await store.create_key(make_principal("globex", "carol")),
            await store.create_key(make_principal("ops", "root", roles=["admin"])),
            path,
        )
    finally:
        await store.close()


@dataclass(frozen=True)
class AbuseServer:
    """A running server with abuse signals, and an AdminService stub."""

    running: RunningServer
    admin: admin_pb2_grpc.AdminServiceStub


@asynccontextmanager
async def abuse_server(
    keys: Keys, abuse: AbuseConfig, *, reply: str = "Hi!", **sections: Any
) -> AsyncIterator[AbuseServer]:
    """The server as configured (rules moderation, ``abuse``), API keys from ``keys``,
    a fake engine answering ``reply``."""
    auth = AuthConfig(keys_db=str(keys.keys_db), bootstrap_admin_key=False, key_cache_ttl_s=0.0)
    config = config_for_tests(
        auth=auth, abuse=abuse, moderation=ModerationConfig(moderator="rules"), **sections
    )
    async with running_server(
        FakeBackend(reply=reply), config, store=SQLiteConversationStore(":memory:")
    ) as running:
        yield AbuseServer(running, admin_pb2_grpc.AdminServiceStub(running.channel))


def abuse_config(**fields: Any) -> AbuseConfig:
    """Abuse signals in memory with :data:`RULES`' thresholds, unless told otherwise."""
    base = AbuseConfig(
        store="memory",
        throttle_after=RULES.throttle_after,
        suspend_after=RULES.suspend_after,
        throttle_turns_per_minute=RULES.throttle_turns,
        suspend_s=0.0,  # until lifted, unless a test says otherwise
    )
    return dataclasses.replace(base, **fields)


@dataclass(frozen=True)
class Outcome:
    """How a call ended: its status, message, google.rpc RetryInfo delay and QuotaFailure."""

    code: grpc.StatusCode
    message: str = ""
    retry_after_s: float | None = None
    quota_ids: tuple[str, ...] = ()


def outcome_of(error: grpc.aio.AioRpcError) -> Outcome:
    """The status and rich details of ``error``."""
    retry: float | None = None
    quota_ids: list[str] = []
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)  # type: ignore[arg-type]
        for detail in status.details:
            info, failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
            if detail.Unpack(info):
                retry = info.retry_delay.ToTimedelta().total_seconds()
            elif detail.Unpack(failure):
                quota_ids += [v.quota_id for v in failure.violations]
    return Outcome(error.code(), error.details() or "", retry, tuple(quota_ids))


async def complete(chat: Any, key: IssuedKey, message: str) -> Outcome:
    """One Complete turn as ``key``'s caller; OK or how it was refused."""
    request = chat_pb2.CompleteRequest(message=message)
    try:
        async for _ in chat.Complete(request, metadata=bearer(key.secret)):
            pass
    except grpc.aio.AioRpcError as error:
        return outcome_of(error)
    return Outcome(grpc.StatusCode.OK)


async def outcome(call: Callable[[], Any]) -> Outcome:
    """Await ``call()``; OK or how it was refused."""
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        return outcome_of(error)
    return Outcome(grpc.StatusCode.OK)
