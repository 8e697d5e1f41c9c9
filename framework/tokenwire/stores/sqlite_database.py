"""One SQLite connection on one worker thread: what the embedded stores share.

:class:`SQLiteDatabase` owns the connection, the thread it lives on, the
PRAGMAs and the schema migrations; a store composes one and hands it the
functions that touch the connection::

    db = SQLiteDatabase(
        "var/notes.db",
        migrations=(("CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT NOT NULL)",),),
        name="note",
        closed_error=StoreClosedError,
        thread_name="tokenwire-notes",
    )
    await db.open()
    count = await db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM notes").fetchone()[0])
    await db.close()

The event loop never waits on disk and sqlite3's same-thread rule holds; calls
run on the worker in the order they were made. The file runs in WAL mode with
``synchronous=NORMAL``: a committed write survives a crash of the process; a
power loss may undo the last few commits (SQLite's documented trade-off for
WAL at this level), never corrupt the file. WAL also lets several processes
share one file.

Migrations are applied by ``open()``, each in one transaction, and progress is
recorded in ``PRAGMA user_version``: migration ``n`` (1-based) brings a file to
``user_version = n``. Only ever append: a shipped migration never changes.

The files hold every tenant's data, so they are the server user's alone: missing
directories are created 0700, the database 0600, and its ``-wal`` and ``-shm``
files (which SQLite creates with the database's mode) are checked after connecting.
A file an older release left readable to others is narrowed to its owner on open.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from tokenwire.errors import ConfigError
from tokenwire.private_files import create_private_file, make_private_dirs, restrict_to_owner

__all__ = ["SQLiteDatabase", "read_transaction", "write_transaction"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


@dataclass(frozen=True, slots=True)
class _Worker:
    """The open connection and the one thread allowed to touch it."""

    executor: ThreadPoolExecutor
    conn: sqlite3.Connection


class SQLiteDatabase:
    """One SQLite file (or ``":memory:"``), one connection, one worker thread.

    ``name`` says what the file holds, in error messages ("conversation" gives
    "conversation store is closed" and "conversation database is at schema
    version …"); ``closed_error`` is raised, with such a message, by calls made
    before :meth:`open` or after :meth:`close`. ``thread_name`` prefixes the
    worker thread's name. A missing file is created with mode 0600, and its
    missing parent directories with 0700, before SQLite opens it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        migrations: Sequence[Sequence[str]],
        name: str,
        closed_error: type[Exception],
        thread_name: str,
    ) -> None:
        self._path = os.fspath(path)
        self._migrations = migrations
        self._name = name
        self._closed_error = closed_error
        self._thread_name = thread_name
        self._worker: _Worker | None = None
        self._closed = False
        # Serializes open() and close() so racing calls cannot start two workers.
        self._lifecycle = asyncio.Lock()

    @property
    def path(self) -> str:
        """The database file, or ``":memory:"``."""
        return self._path

    async def open(self) -> None:
        """Connect, set the pragmas and apply pending migrations. A second call is a no-op.

        After :meth:`close` it raises ``closed_error``: a database is not reopened.
        """
        async with self._lifecycle:
            if self._worker is not None:
                return
            if self._closed:
                raise self._closed_error(f"{self._name} store is closed and cannot be reopened")
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name)
            opened: list[sqlite3.Connection] = []
            try:
                conn = await asyncio.get_running_loop().run_in_executor(
                    executor, self._connect, opened
                )
            except BaseException:
                # Failed or cancelled: the connect may still finish on the worker,
                # so close what it opened there (a connection stays on its thread).
                executor.submit(_close_all, opened)
                executor.shutdown(wait=True)
                raise
            self._worker = _Worker(executor, conn)

    async def close(self) -> None:
        """Finish queued calls, close the connection and stop the worker thread.

        Idempotent. Calls made after ``close()`` starts raise ``closed_error``.
        """
        async with self._lifecycle:
            worker, self._worker, self._closed = self._worker, None, True
            if worker is None:
                return
            # Calls queued before this one still run first (one thread, FIFO);
            # calls made from now on are refused by run().
            try:
                await asyncio.get_running_loop().run_in_executor(worker.executor, worker.conn.close)
            finally:
                # The queue is empty by now, so this join returns at once.
                worker.executor.shutdown(wait=True)

    async def run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run ``fn(conn, *args, **kwargs)`` on the worker thread; ``closed_error`` if not open."""
        worker = self._worker
        if worker is None:
            if self._closed:
                raise self._closed_error(f"{self._name} store is closed")
            raise self._closed_error(f"{self._name} store is not open; call open() first")
        call = functools.partial(fn, worker.conn, *args, **kwargs)
        # If the awaiting task is cancelled the call still runs to commit or
        # rollback on the worker; only its result is dropped.
        return await asyncio.get_running_loop().run_in_executor(worker.executor, call)

    # --- worker-thread side: everything below touches the connection -------

    def _connect(self, opened: list[sqlite3.Connection]) -> sqlite3.Connection:
        on_disk = self._path != ":memory:"
        if on_disk:
            path = Path(self._path)
            make_private_dirs(path.parent)
            # Created before SQLite opens it, which would use the umask's mode;
            # SQLite gives the -wal and -shm files the database file's mode.
            # (Not a umask around connect: the umask is process-wide, and other
            # threads create files too.)
            if not create_private_file(path):
                restrict_to_owner(path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so every
        # transaction boundary is explicit.
        conn = sqlite3.connect(self._path, timeout=5.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA busy_timeout = 5000")
            self._migrate(conn)
            if on_disk:
                # They exist by now; ones left by an older release may be readable.
                for suffix in ("-wal", "-shm"):
                    restrict_to_owner(self._path + suffix)
        except BaseException:
            conn.close()
            raise
        opened.append(conn)
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Apply the migrations this file has not seen, one transaction each."""
        known = len(self._migrations)
        for version, statements in enumerate(self._migrations, start=1):
            with write_transaction(conn):
                # Re-read under the write lock: another process may have migrated
                # the file since we last looked.
                (current,) = conn.execute("PRAGMA user_version").fetchone()
                if current > known:
                    raise ConfigError(
                        f"{self._name} database is at schema version {current}, newer than"
                        f" this tokenwire knows ({known}); upgrade tokenwire"
                    )
                if current >= version:
                    continue
                for statement in statements:
                    conn.execute(statement)
                # PRAGMA takes no parameters; `version` is our own int.
                conn.execute(f"PRAGMA user_version = {version}")


def _close_all(connections: list[sqlite3.Connection]) -> None:
    for conn in connections:
        conn.close()


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    """``BEGIN …`` then COMMIT, or ROLLBACK on any error (a failed COMMIT included)."""
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def write_transaction(conn: sqlite3.Connection) -> AbstractContextManager[None]:
    """A ``BEGIN IMMEDIATE`` transaction: it holds the write lock from the start.

    So a read-then-write inside it cannot race another writer, even one in
    another process.
    """
    return _transaction(conn, "BEGIN IMMEDIATE")


def read_transaction(conn: sqlite3.Connection) -> AbstractContextManager[None]:
    """A plain ``BEGIN`` transaction: its reads see one snapshot of the file."""
    return _transaction(conn, "BEGIN")
