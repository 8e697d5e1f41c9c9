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

Two ways to run a call, one transaction each, never two at once (a lock guards
the connection):

* :meth:`SQLiteDatabase.run_fast` runs it right away on the calling thread (the
  event loop) when the connection is free and no other process holds the file's
  write lock. A short transaction on indexed rows costs tens of microseconds with
  no fsync (WAL at ``synchronous=NORMAL``), less than handing it to a thread and
  back: under load each hand-off waits two or three turns of a busy event loop,
  which is what a chat turn's time to first token would pay. Otherwise the call
  goes to the worker.
* :meth:`SQLiteDatabase.run` runs it on the worker thread, in the order calls
  were made; the worker waits out another process's write lock (up to 5 s) and
  takes every call waiting at once, handing their results back in one wake-up.

The worker also runs the WAL checkpoints (every 1000 calls), which do wait on
disk, so the event loop never does. The file runs in WAL mode with
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
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from tokenwire.errors import ConfigError
from tokenwire.logs import get_logger
from tokenwire.private_files import create_private_file, make_private_dirs, restrict_to_owner

__all__ = ["SQLiteDatabase", "read_transaction", "write_transaction"]

_T = TypeVar("_T")
_log = get_logger("tokenwire.stores")
_P = ParamSpec("_P")


_Job = tuple[Callable[[], Any], "asyncio.Future[Any] | None"]  # None: nobody waits for it


_BUSY_WAIT_S = 5.0  # how long the worker waits for another process's write lock
_CHECKPOINT_EVERY = 1000  # calls between WAL checkpoints (run on the worker)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _WorkerThread:
    """One thread that runs calls in order and reports results in batches.

    A call is queued with the future that awaits it; the thread runs every call
    waiting at that moment, then sets all their futures with a single
    ``call_soon_threadsafe``. A call whose awaiting task was cancelled still
    runs (to commit or roll back); only its result is dropped.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopped = loop.create_future()
        self._thread.start()

    def call(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        """Queue ``fn``; the future resolves on the event loop once it ran."""
        assert self._loop is not None
        future: asyncio.Future[_T] = self._loop.create_future()
        self._jobs.put((fn, future))
        return future

    def post(self, fn: Callable[[], object]) -> None:
        """Queue ``fn`` with nobody waiting for it (from any thread); failures are logged."""
        self._jobs.put((fn, None))

    async def stop(self) -> None:
        """Run what is queued, then end the thread."""
        assert self._stopped is not None
        self._jobs.put(None)
        await asyncio.shield(self._stopped)

    def _serve(self) -> None:
        loop, jobs = self._loop, self._jobs
        assert loop is not None
        running = True
        while running:
            batch = [jobs.get()]
            while True:  # take everything else already waiting
                try:
                    batch.append(jobs.get_nowait())
                except queue.Empty:
                    break
            done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            for job in batch:
                if job is None:
                    running = False
                    continue
                fn, future = job
                if future is None:
                    # Background work (a checkpoint) may wait on disk: answer first.
                    if done and not self._answer(done, None):
                        return
                    done = []
                    try:
                        fn()
                    except Exception:
                        _log.exception("background database work failed")
                    continue
                try:
                    done.append((future, fn(), None))
                except BaseException as exc:  # handed to the awaiting task
                    done.append((future, None, exc))
            if not self._answer(done, None if running else self._stopped):
                return

    def _answer(
        self,
        done: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
        stopped: asyncio.Future[None] | None,
    ) -> bool:
        """Hand results to the event loop; False once the loop is closed."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_settle, done, stopped)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        return True


def _settle(
    done: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
    stopped: asyncio.Future[None] | None,
) -> None:
    for future, result, error in done:
        if future.cancelled():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    if stopped is not None and not stopped.done():
        stopped.set_result(None)


@dataclass(frozen=True, slots=True)
class _Worker:
    """The open connection and the worker thread (the event loop uses it too: see run_fast)."""

    thread: _WorkerThread
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
        # One call at a time on the connection, whichever thread makes it.
        self._lock = threading.Lock()
        self._calls = 0

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
            thread = _WorkerThread(self._thread_name)
            thread.start(asyncio.get_running_loop())
            opened: list[sqlite3.Connection] = []
            try:
                conn = await thread.call(functools.partial(self._connect, opened))
            except BaseException:
                # Failed or cancelled: the connect may still finish on the worker,
                # so close what it opened there (a connection stays on its thread).
                thread.call(functools.partial(_close_all, opened))
                await thread.stop()
                raise
            self._worker = _Worker(thread, conn)

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
                await worker.thread.call(worker.conn.close)
            finally:
                await worker.thread.stop()

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
        # If the awaiting task is cancelled the call still runs to commit or
        # rollback on the worker; only its result is dropped.
        call = functools.partial(fn, worker.conn, *args, **kwargs)
        return await worker.thread.call(functools.partial(self._on_worker, call))

    async def run_fast(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run ``fn(conn, *args, **kwargs)`` now on this thread if the connection is free
        and the file not locked by another process, else as :meth:`run` does.

        For short transactions only (a few indexed rows): the event loop waits for it.
        """
        worker = self._worker
        if worker is not None and self._lock.acquire(blocking=False):
            try:
                result = fn(worker.conn, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                # Another process holds the write lock: the worker waits for it.
            else:
                self._count(worker)
                return result
            finally:
                self._lock.release()
        return await self.run(fn, *args, **kwargs)

    def _on_worker(self, call: Callable[[], _T]) -> _T:
        """Run ``call`` under the lock, waiting out another process's write lock."""
        waited = 0.0
        while True:
            with self._lock:
                try:
                    result = call()
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc) or waited >= _BUSY_WAIT_S:
                        raise
                else:
                    worker = self._worker
                    if worker is not None:
                        self._count(worker)
                    return result
            time.sleep(0.002)  # outside the lock, so the event loop's calls go on
            waited += 0.002

    def _count(self, worker: _Worker) -> None:
        # Called with the lock held.
        self._calls += 1
        if self._calls % _CHECKPOINT_EVERY == 0 and self._path != ":memory:":
            worker.thread.post(functools.partial(self._checkpoint, worker.conn))

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

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
        # check_same_thread=False: calls come from the worker and the event loop,
        # one at a time (self._lock).
        conn = sqlite3.connect(
            self._path, timeout=_BUSY_WAIT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Checkpoints run on the worker (_count), never inside a call.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._migrate(conn)
            # From now on a call never blocks on another process's lock: the
            # event loop's calls go to the worker instead, which retries.
            conn.execute("PRAGMA busy_timeout = 0")
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
