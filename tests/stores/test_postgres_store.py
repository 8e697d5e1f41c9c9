"""PostgresConversationStore beyond the shared contract: opening, migrating, failing to connect."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.stores.conftest import drop_schema, fresh_schema
from tokenwire.config import StoreConfig
from tokenwire.errors import ConfigError, UnavailableError
from tokenwire.stores import SQLiteConversationStore, StoreClosedError, open_store_from_config
from tokenwire.stores.postgres import PostgresConversationStore
from tokenwire.stores.postgres_schema import MIGRATIONS


@pytest.fixture
async def schema(postgres_dsn_or_skip: str) -> AsyncIterator[str]:
    """A schema name nobody has used yet, dropped after the test."""
    name = fresh_schema()
    yield name
    await drop_schema(name)


def _closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_gateways_starting_together_migrate_once(
    postgres_dsn_or_skip: str, schema: str
) -> None:
    """Four stores opened at once on a fresh schema all open; each migration is applied once."""
    stores = [PostgresConversationStore(postgres_dsn_or_skip, schema=schema) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        conversation = await stores[0].create_conversation("alice", title="t")
        seen = [await s.get_conversation("alice", conversation.id) for s in stores]
    finally:
        for s in stores:
            await s.close()

    conn = await asyncpg.connect(postgres_dsn_or_skip)
    try:
        versions = await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')
        gateways = await conn.fetchval(f'SELECT COUNT(*) FROM "{schema}".gateways')
    finally:
        await conn.close()
    assert [conversation] * 4 == seen
    assert (list(range(1, len(MIGRATIONS) + 1)), 0) == ([r[0] for r in versions], gateways)


async def test_a_newer_schema_is_refused(postgres_dsn_or_skip: str, schema: str) -> None:
    """A schema migrated by a newer release fails open() with a ConfigError."""
    async with PostgresConversationStore(postgres_dsn_or_skip, schema=schema):
        pass
    conn = await asyncpg.connect(postgres_dsn_or_skip)
    try:
        await conn.execute(
            f'INSERT INTO "{schema}".schema_migrations (version) VALUES ($1)', len(MIGRATIONS) + 1
        )
    finally:
        await conn.close()

    newer = PostgresConversationStore(postgres_dsn_or_skip, schema=schema)
    with pytest.raises(ConfigError, match="newer"):
        await newer.open()
    with pytest.raises(StoreClosedError, match="not open"):
        await newer.create_conversation("alice", title="t")


async def test_calls_outside_open_raise_store_closed(
    postgres_dsn_or_skip: str, schema: str
) -> None:
    """Calls before open() or after close() raise StoreClosedError; close() is idempotent."""
    store = PostgresConversationStore(postgres_dsn_or_skip, schema=schema)
    with pytest.raises(StoreClosedError, match="not open"):
        await store.create_conversation("alice", title="t")

    await store.open()
    await store.open()
    await store.close()
    await store.close()

    with pytest.raises(StoreClosedError, match="closed"):
        await store.list_conversations("alice", page_size=5)
    with pytest.raises(StoreClosedError):
        await store.open()


async def test_an_unreachable_server_is_unavailable_and_named_without_secrets() -> None:
    """open() against a closed port is StoreClosedError (UNAVAILABLE) naming host and port."""
    port = _closed_port()
    store = PostgresConversationStore(
        f"postgresql://tokenwire:s3cret-pw@127.0.0.1:{port}/chat", connect_timeout_s=2.0
    )

    with pytest.raises(StoreClosedError) as caught:
        await store.open()

    message = caught.value.message
    assert isinstance(caught.value, UnavailableError)
    assert f"PostgreSQL at 127.0.0.1:{port}/chat is not reachable" in message
    assert ("s3cret-pw" not in message, "tokenwire" not in message) == (True, True)


def test_a_schema_name_that_is_not_plain_is_a_config_error() -> None:
    """Only lowercase letters, digits and '_' make a schema name."""
    with pytest.raises(ConfigError, match="postgres_schema"):
        PostgresConversationStore("postgresql://127.0.0.1/x", schema='chat"; DROP TABLE x; --')


def test_open_store_from_config_builds_the_configured_store() -> None:
    """backend 'sqlite' and 'postgres' give the matching store, not yet opened."""
    sqlite = open_store_from_config(StoreConfig(backend="sqlite", sqlite_path=":memory:"))
    postgres = open_store_from_config(
        StoreConfig(
            backend="postgres",
            postgres_dsn="postgresql://db.internal:6543/chat",
            postgres_schema="tenant_a",
        )
    )

    assert isinstance(sqlite, SQLiteConversationStore)
    assert ":memory:" == sqlite.path
    assert isinstance(postgres, PostgresConversationStore)
    assert "db.internal:6543/chat" == postgres.where
