"""Store test kit: each contract test runs on SQLite and on PostgreSQL.

The ``backend`` fixture gives a :class:`Backend`: a database (a SQLite file in
the test's tmp dir, or a fresh schema of its own in the PostgreSQL test server
on 127.0.0.1:5432, or ``TOKENWIRE_TEST_POSTGRES_DSN``, dropped afterwards), a
:class:`ManualClock` every store of it reads, a way to open more stores (more
gateways) on the same database, and raw row counts. When PostgreSQL is
unreachable its runs skip, except with ``TOKENWIRE_TEST_REQUIRE_SERVICES`` set,
where they fail (see ``tests/conftest.py``).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.conftest import POSTGRES_DSN, postgres_problem, require_service
from tokenwire.stores import ConversationStore, SQLiteConversationStore
from tokenwire.stores.postgres import PostgresConversationStore

STORES = ["sqlite", "postgres"]
OWNER = "acme/alice"
OTHER = "acme/bob"
HEARTBEAT_S = 2.0
GATEWAY_TIMEOUT_S = 10.0
IDEMPOTENCY_TTL_S = 100.0


class ManualClock:
    """Unix seconds that move only a millisecond a reading, unless :meth:`advance`d."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 0.001
        return self.now

    def advance(self, seconds: float) -> None:
        """Jump ``seconds`` forward."""
        self.now += seconds


class Backend:
    """One database under test, and the stores opened on it (closed at teardown)."""

    def __init__(self, kind: str, *, path: Path | None = None, schema: str = "") -> None:
        self.kind = kind
        self.clock = ManualClock()
        self._path = path
        self.schema = schema
        self._stores: list[ConversationStore] = []

    def new_store(self) -> Any:
        """A new, unopened store (gateway) on this database, closed at teardown."""
        timings = {
            "clock": self.clock,
            "heartbeat_s": HEARTBEAT_S,
            "gateway_timeout_s": GATEWAY_TIMEOUT_S,
            "idempotency_ttl_s": IDEMPOTENCY_TTL_S,
        }
        store: Any
        if self._path is not None:
            store = SQLiteConversationStore(self._path, **timings)
        else:
            store = PostgresConversationStore(
                POSTGRES_DSN, schema=self.schema, pool_size=4, **timings
            )
        self._stores.append(store)
        return store

    async def open_store(self) -> Any:
        """:meth:`new_store`, opened."""
        store = self.new_store()
        await store.open()
        return store

    async def count(self, table: str, where: str = "TRUE") -> int:
        """Rows of ``table`` matching the SQL condition ``where``, read beside the stores."""
        sql = f"SELECT COUNT(*) FROM {table} WHERE {where}"
        if self._path is not None:
            with closing(sqlite3.connect(self._path)) as conn:
                (count,) = conn.execute(sql.replace("TRUE", "1")).fetchone()
            return int(count)
        conn = await asyncpg.connect(POSTGRES_DSN, server_settings={"search_path": self.schema})
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    async def close(self) -> None:
        for store in self._stores:
            await store.close()


async def drop_schema(schema: str) -> None:
    """Drop a test schema and everything in it."""
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def fresh_schema() -> str:
    """A schema name no other test uses."""
    return f"tw_test_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def postgres_dsn_or_skip() -> str:
    """The PostgreSQL test DSN; skips (fails, when services are required) if unreachable."""
    require_service("PostgreSQL", POSTGRES_DSN, postgres_problem())
    return POSTGRES_DSN


@pytest.fixture(params=STORES)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A fresh database of each kind, with stores to open on it."""
    if request.param == "sqlite":
        kit = Backend("sqlite", path=tmp_path / "conversations.db")
        yield kit
        await kit.close()
        return
    require_service("PostgreSQL", POSTGRES_DSN, postgres_problem())
    kit = Backend("postgres", schema=fresh_schema())
    try:
        yield kit
        await kit.close()
    finally:
        await drop_schema(kit.schema)


@pytest.fixture
async def store(backend: Backend) -> Any:
    """An open store (the first gateway) on the backend's database."""
    return await backend.open_store()
