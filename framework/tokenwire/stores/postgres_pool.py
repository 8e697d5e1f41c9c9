"""The asyncpg pool behind :class:`~tokenwire.stores.postgres.PostgresConversationStore`.

:class:`PostgresPool` opens the pool (with ``search_path`` set to the store's
schema), migrates the schema, runs one statement per call and turns what asyncpg
raises when the server cannot be reached into the framework's errors, naming
the server by host, port and database only: never the user or the password::

    pool = PostgresPool("postgresql://db.internal/tokenwire", schema="chat", size=10)
    await pool.open()
    count = await pool.call("fetchval", "SELECT count(*) FROM conversations")
    await pool.close()
"""

from __future__ import annotations

import asyncio
from typing import Any, Final
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]

from tokenwire.errors import UnavailableError
from tokenwire.stores import postgres_schema as pg_schema
from tokenwire.stores.conversations import StoreClosedError

__all__ = ["PostgresPool", "describe_dsn"]

# What says the server or the network is gone, rather than that the query is wrong.
_UNREACHABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)


class PostgresPool:
    """At most ``size`` connections to ``dsn``, on ``schema``; opened once, closed once."""

    def __init__(self, dsn: str, *, schema: str, size: int, connect_timeout_s: float) -> None:
        if size < 1:
            raise ValueError(f"pool_size must be >= 1, got {size}")
        self._dsn = dsn
        self._schema = schema
        self._search_path = pg_schema.check_schema_name(schema)
        self._size = size
        self._connect_timeout_s = connect_timeout_s
        self._pool: Any = None
        self._closed = False
        self._lifecycle = asyncio.Lock()

    @property
    def where(self) -> str:
        """``host:port/database``, as errors name the server."""
        return describe_dsn(self._dsn)

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` succeeded and :meth:`close` has not started."""
        return self._pool is not None

    async def open(self) -> bool:
        """Connect and migrate; True if this call opened the pool, False if it was open.

        StoreClosedError (UNAVAILABLE) when PostgreSQL cannot be reached or refuses
        the connection, or after :meth:`close`; ConfigError for a schema newer than
        this release.
        """
        async with self._lifecycle:
            if self._pool is not None:
                return False
            if self._closed:
                raise StoreClosedError("conversation store is closed and cannot be reopened")
            try:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._size,
                    timeout=self._connect_timeout_s,
                    server_settings={"search_path": self._search_path},
                )
            except (*_UNREACHABLE, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise StoreClosedError(
                    f"PostgreSQL at {self.where} is not reachable: {self._why(exc)}"
                ) from exc
            try:
                async with pool.acquire() as conn:
                    await pg_schema.migrate(conn, self._schema, pg_schema.MIGRATIONS)
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool
            return True

    async def close(self, last: tuple[str, ...] = ()) -> None:
        """Run the statement ``last`` (query and arguments) if given, then close the pool
        once the calls in flight are done. Idempotent; later calls raise StoreClosedError."""
        async with self._lifecycle:
            self._closed = True
            pool, self._pool = self._pool, None
            if pool is None:
                return
            try:
                if last:
                    await pool.execute(*last)
            except (*_UNREACHABLE, asyncpg.PostgresError):
                pass  # the server is gone: nothing more to tidy there
            finally:
                await pool.close()

    async def call(self, method: str, query: str, *args: Any) -> Any:
        """``asyncpg.Pool.<method>(query, *args)``: one statement on a pooled connection.

        StoreClosedError when not open; UnavailableError when PostgreSQL cannot be
        reached; asyncpg's own error when the statement fails.
        """
        pool = self._pool
        if pool is None:
            if self._closed:
                raise StoreClosedError("conversation store is closed")
            raise StoreClosedError("conversation store is not open; call open() first")
        try:
            return await getattr(pool, method)(query, *args)
        except _UNREACHABLE as exc:
            raise UnavailableError(
                f"PostgreSQL at {self.where} is not reachable: {self._why(exc)}"
            ) from exc
        except asyncpg.InterfaceError as exc:
            if self._pool is None:  # closed while this call waited for a connection
                raise StoreClosedError("conversation store is closed") from exc
            raise

    def _why(self, exc: BaseException) -> str:
        """``exc`` in a few words, with the DSN's password (if any) blotted out."""
        text = f"{type(exc).__name__}: {exc}"
        password = _dsn_fields(self._dsn).get("password", "")
        return text.replace(password, "***") if password else text


def describe_dsn(dsn: str) -> str:
    """``host:port/database`` of a URL or ``key=value`` DSN (libpq's defaults aside)."""
    fields = _dsn_fields(dsn)
    host = fields.get("host") or "localhost"
    return f"{host}:{fields.get('port') or '5432'}/{fields.get('dbname', '')}"


def _dsn_fields(dsn: str) -> dict[str, str]:
    if "://" not in dsn:
        return dict(part.split("=", 1) for part in dsn.split() if "=" in part)
    try:
        url = urlsplit(dsn)
        port = url.port
    except ValueError:
        return {"host": "(unparsable DSN)"}
    return {
        "host": url.hostname or "",
        "port": str(port or ""),
        "dbname": url.path.lstrip("/"),
        "password": url.password or "",
    }
