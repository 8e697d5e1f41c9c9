"""A gateway with API keys for two users of one tenant and one of another."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.conftest import POSTGRES_DSN, postgres_problem, require_service
from tests.stores.conftest import STORES, drop_schema, fresh_schema
from tokenwire.auth.keys import make_principal
from tokenwire.config import Config
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc, conversations_pb2_grpc
from tokenwire.stores import ConversationStore, SQLiteConversationStore
from tokenwire.stores.postgres import PostgresConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

REPLY = "The quick brown fox jumps over the lazy dog."


def keyed_config(data_dir: Path, **store: object) -> Config:
    """Authentication by API key (keys in ``data_dir``), the store settings given."""
    base = config_for_tests()
    return config_for_tests(
        auth=dataclasses.replace(base.auth, enabled=True, api_keys=True, bootstrap_admin_key=False),
        store=dataclasses.replace(base.store, data_dir=str(data_dir), **store),
    )


@dataclass
class Device:
    """One signed-in client: its own channel and stubs, one principal's key."""

    channel: grpc.aio.Channel
    chat: chat_pb2_grpc.ChatServiceAsyncStub
    conversations: conversations_pb2_grpc.ConversationServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]

    async def complete(self, message: str, **fields: object) -> list[chat_pb2.CompleteResponse]:
        """Every event of one Complete turn."""
        call = self.chat.Complete(
            chat_pb2.CompleteRequest(message=message, **fields),  # type: ignore[arg-type]
            metadata=self.metadata,
        )
        return [event async for event in call]


@dataclass
class Gateway:
    """A running server and a way to sign devices in."""

    running: RunningServer
    backend: FakeBackend
    keys: dict[str, str]
    channels: list[grpc.aio.Channel]

    def device(self, who: str) -> Device:
        """A new client connection signed in as ``who`` ("alice", "bob" or "eve")."""
        channel = grpc.aio.insecure_channel(self.running.address)
        self.channels.append(channel)
        return Device(
            channel,
            chat_pb2_grpc.ChatServiceStub(channel),
            conversations_pb2_grpc.ConversationServiceStub(channel),
            (("authorization", f"Bearer {self.keys[who]}"),),
        )


async def sign_up(running: RunningServer) -> dict[str, str]:
    """Keys for acme/alice, acme/bob and other/alice (same user name, other tenant)."""
    auth = running.server.pipeline.auth
    assert auth is not None
    keys = {}
    for name, tenant, user in (
        ("alice", "acme", "alice"),
        ("bob", "acme", "bob"),
        ("eve", "other", "alice"),
    ):
        issued = await auth.key_store.create_key(make_principal(tenant, user))
        keys[name] = issued.secret
    return keys


@contextlib.asynccontextmanager
async def conversation_store(kind: str, tmp_path: Path) -> AsyncIterator[ConversationStore]:
    """An unopened store of ``kind``: a SQLite file in ``tmp_path``, or a fresh PostgreSQL
    schema (dropped afterwards; skipped, or failed when required, if PostgreSQL is down)."""
    if kind == "sqlite":
        yield SQLiteConversationStore(tmp_path / "conversations.db")
        return
    require_service("PostgreSQL", POSTGRES_DSN, postgres_problem())
    schema = fresh_schema()
    try:
        yield PostgresConversationStore(POSTGRES_DSN, schema=schema, pool_size=4)
    finally:
        await drop_schema(schema)


@pytest.fixture(params=STORES)
async def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway over a fake engine that streams REPLY a token every 5 ms, on each store."""
    backend = FakeBackend(reply=REPLY, token_delay_s=0.005)
    async with (
        conversation_store(request.param, tmp_path) as store,
        running_server(backend, keyed_config(tmp_path), store=store) as running,
    ):
        gateway = Gateway(running, backend, await sign_up(running), [])
        try:
            yield gateway
        finally:
            for channel in gateway.channels:
                await channel.close(None)
