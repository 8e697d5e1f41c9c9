"""The Redis live bus: every gateway sees every conversation's live events.

One Redis stream per conversation (``<key_prefix><conversation id>``), capped with
``XADD ... MAXLEN ~ buffer_events`` and expiring ``retain_s`` after its last event.
An entry is one field, ``e``: compact JSON of the event's non-default fields.

Publishing never waits for Redis: :meth:`RedisLiveBus.publish` appends to a
bounded in-process queue that one background task drains in order, pipelining a
batch of XADDs per round trip. When the queue is full the event is dropped (and
logged once per conversation until the queue drains).

Following reads history with XRANGE, then blocks on XREAD from the last id read,
on a connection of its own. A follower counts the entries it has passed; each read
asks, in the same MULTI, for the stream's ``entries-added`` and length (Redis 7).
When the oldest entry left (number ``entries-added - length + 1``) is past the one
after the follower's, the trim removed events it never saw: it gets :class:`Lagged`.

    bus = RedisLiveBus("redis://127.0.0.1:6379/0", buffer_events=4096)
    await bus.open()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from tokenwire.errors import UnavailableError
from tokenwire.live.bus import Lagged, LiveEvent, decode_event, encode_event
from tokenwire.logs import get_logger

__all__ = ["RedisLiveBus"]

_log = get_logger("tokenwire.live")

_T = TypeVar("_T")
_FIELD = b"e"
_BATCH = 512  # queued items per pipeline, and entries per read


def _public_url(url: str) -> str:
    """``url`` without its user and password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


class _Closed:
    """What a wait returns when the bus closed first."""


_CLOSED = _Closed()


@dataclass(frozen=True, slots=True)
class _Anchor:
    """Asks the writer where the stream ends once everything published before it is written:
    its last id and entries ever added (``b"0-0", 0`` when there is no stream)."""

    conversation_id: str
    future: asyncio.Future[tuple[bytes, int]]


_Item = tuple[str, LiveEvent] | _Anchor
_NO_STREAM = (b"0-0", 0)


class RedisLiveBus:
    """Live events in Redis Streams, shared by every gateway that uses the same ``key_prefix``.

    ``queue_events`` bounds the events waiting to be written; ``timeout_s`` bounds a
    Redis reply (a follower's blocking read waits ``block_ms`` longer). Needs Redis 7
    to tell followers that they lagged.

        bus = RedisLiveBus("redis://127.0.0.1:6379/0", key_prefix="tokenwire:live:")
        await bus.open()
        async for item in bus.follow("c-1", from_start=True):
            ...
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        buffer_events: int = 4096,
        retain_s: float = 300.0,
        key_prefix: str = "tokenwire:live:",
        queue_events: int = 65_536,
        timeout_s: float = 2.0,
        block_ms: int = 1000,
    ) -> None:
        if min(buffer_events, queue_events, block_ms) < 1 or not retain_s > 0:
            raise ValueError("buffer_events, queue_events, retain_s and block_ms must be positive")
        self._url = url
        self._where = _public_url(url)
        self._buffer_events = buffer_events
        self._retain_ms = max(1, int(retain_s * 1000))
        self._prefix = key_prefix
        self._queue_events = queue_events
        self._timeout_s = timeout_s
        self._block_ms = block_ms
        self._queue: deque[_Item] = deque()
        self._queued = 0  # events (not anchors) in the queue
        self._dropping: set[str] = set()  # conversations whose drops were logged
        self._failing = False
        self._wake: asyncio.Event | None = None
        self._put = 0  # items ever put on the queue
        self._done = 0  # items written (or dropped)
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._client: aioredis.Redis | None = None
        self._readers: aioredis.ConnectionPool | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this bus writes."""
        return self._prefix

    def _pool(self, socket_timeout: float) -> aioredis.ConnectionPool:
        return aioredis.ConnectionPool.from_url(
            self._url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),  # a resent XADD would duplicate; errors surface
        )

    async def open(self) -> None:
        """Check that Redis answers and start writing what is published."""
        if self._closing is not None and not self._closing.done():
            return
        client = aioredis.Redis.from_pool(self._pool(self._timeout_s))
        try:
            server = await client.info("server")
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise UnavailableError(
                f"live event bus: Redis at {self._where} is unreachable ({type(exc).__name__})"
            ) from exc
        if int(str(server.get("redis_version", "0")).split(".")[0]) < 7:
            _log.warning("live event bus: Redis < 7 cannot tell followers that they lagged")
        self._client = client
        self._readers = self._pool(self._timeout_s + self._block_ms / 1000)
        loop = asyncio.get_running_loop()
        self._closing = loop.create_future()
        self._wake = wake = asyncio.Event()
        if self._queue:
            wake.set()  # published before open()
        self._writer = loop.create_task(self._write_forever(client, wake), name="live-bus-writer")

    async def close(self, *, flush_timeout_s: float = 5.0) -> None:
        """Write what is queued (for up to ``flush_timeout_s``), end followers, disconnect."""
        if self._closing is None or self._closing.done():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), flush_timeout_s)
        self._closing.set_result(None)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        self._drop_queue()
        if self._client is not None:
            await self._client.aclose()
        if self._readers is not None:
            await self._readers.aclose()
        self._client = self._readers = None

    async def flush(self) -> None:
        """Wait until everything published before this call is written (or dropped)."""
        if self._done >= self._put or self._writer is None:
            return
        future = asyncio.get_running_loop().create_future()
        self._flushes.append((self._put, future))
        await future

    def publish(self, conversation_id: str, event: LiveEvent) -> None:
        """Queue ``event`` for writing; dropped (and logged) when the queue is full."""
        if self._closing is not None and self._closing.done():
            return
        if self._queued >= self._queue_events:
            if conversation_id not in self._dropping:
                self._dropping.add(conversation_id)
                _log.warning(
                    "live event queue full: dropping events",
                    conversation_id=conversation_id,
                    queued=self._queued,
                )
            return
        self._queue.append((conversation_id, event))
        self._queued += 1
        self._put += 1
        if self._wake is not None:
            self._wake.set()

    def follow(
        self, conversation_id: str, *, from_start: bool = False
    ) -> AsyncGenerator[LiveEvent | Lagged, None]:
        """Follow the conversation from now on (``from_start``: from its oldest entry).

        "Now" is a place in this bus's write order: events it published before the
        call are not seen, events it publishes after are.
        """
        anchor: _Anchor | None = None
        closing = self._closing
        if not from_start and closing is not None and not closing.done():
            anchor = _Anchor(conversation_id, closing.get_loop().create_future())
            anchor.future.add_done_callback(_retrieve)
            self._queue.append(anchor)
            self._put += 1
            if self._wake is not None:
                self._wake.set()
        return self._iterate(conversation_id, anchor)

    # -- following ----------------------------------------------------------

    async def _iterate(
        self, conversation_id: str, anchor: _Anchor | None
    ) -> AsyncGenerator[LiveEvent | Lagged, None]:
        closing, client, readers = self._closing, self._client, self._readers
        if closing is None:
            raise UnavailableError("live event bus: follow() before open()")
        if closing.done() or client is None or readers is None:
            return
        key = self._prefix + conversation_id
        reader = aioredis.Redis(connection_pool=readers, single_connection_client=True)
        try:
            # `last`: the id of the last entry passed; `passed`: its number in the stream
            # (entries added up to it), None until known.
            last, passed = b"0-0", None
            if anchor is not None:
                got = await self._unless_closed(anchor.future)
                if isinstance(got, _Closed):
                    return
                last, passed = got
            while True:
                read = await self._unless_closed(self._read_after(client, key, last))
                if isinstance(read, _Closed):
                    return
                added, length, entries = read
                if added is not None:
                    first = added - length + 1  # number of the oldest entry left
                    if passed is None or added < passed:  # from the start, or a new stream
                        passed = first - 1
                    elif first > passed + 1:
                        missed, passed = first - passed - 1, first - 1
                        yield Lagged(f"missed {missed} events: the stream was trimmed first")
                for entry_id, entry in entries:
                    last = entry_id
                    passed = None if passed is None else passed + 1
                    if closing.done():
                        return
                    event = _decoded(entry)
                    if event is not None:
                        yield event
                if closing.done():
                    return
                if len(entries) < _BATCH:
                    waited = await self._unless_closed(self._wait_after(reader, key, last))
                    if isinstance(waited, _Closed):
                        return
        finally:
            with contextlib.suppress(RedisError, OSError):
                await reader.aclose()

    async def _read_after(
        self, client: aioredis.Redis, key: str, last: bytes
    ) -> tuple[int | None, int, list[tuple[bytes, dict[bytes, bytes]]]]:
        """In one MULTI: entries ever added, length, and up to a batch of entries after ``last``."""
        with self._errors():
            pipe = client.pipeline(transaction=True)
            pipe.xinfo_stream(key)
            pipe.xrange(key, min=b"(" + last, max="+", count=_BATCH)
            info, entries = await pipe.execute(raise_on_error=False)
            if isinstance(entries, Exception):
                raise entries
            if isinstance(info, ResponseError):
                return 0, 0, []  # no such key: nothing published yet, or it expired
            if isinstance(info, Exception):
                raise info
        added = info.get("entries-added")
        return (
            None if added is None else int(added),
            int(info.get("length", 0)),
            cast("list[tuple[bytes, dict[bytes, bytes]]]", entries),
        )

    async def _wait_after(self, reader: aioredis.Redis, key: str, last: bytes) -> None:
        """Block until the stream has an entry after ``last``, or ``block_ms`` passed."""
        with self._errors():
            await reader.xread({key: last}, count=1, block=self._block_ms)

    async def _unless_closed(self, step: Awaitable[_T]) -> _T | _Closed:
        """``await step``, unless the bus closes first (then the step is cancelled)."""
        closing = self._closing
        assert closing is not None
        task = asyncio.ensure_future(step)
        try:
            await asyncio.wait((task, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if closing.done():
            if not task.cancelled():
                task.exception()  # retrieved: the bus closing explains it
            return _CLOSED
        return task.result()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise UnavailableError(
                f"live event bus: Redis at {self._where} failed ({type(exc).__name__}: {exc})"
            ) from exc

    # -- writing ------------------------------------------------------------

    async def _write_forever(self, client: aioredis.Redis, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
                self._queued -= sum(not isinstance(item, _Anchor) for item in batch)
                try:
                    await self._write(client, batch)
                except Exception as exc:
                    self._write_failed(batch, exc)
                else:
                    if self._failing:
                        self._failing = False
                        _log.info("live event bus: Redis takes events again", redis=self._where)
                self._done += len(batch)
                if not self._queue:
                    self._dropping.clear()
                self._resolve_flushes()

    async def _write(self, client: aioredis.Redis, batch: list[_Item]) -> None:
        """One pipeline: the batch's XADDs in order, an XINFO per anchor, a PEXPIRE per stream."""
        pipe = client.pipeline(transaction=False)
        anchors: list[tuple[int, _Anchor]] = []
        keys: dict[str, None] = {}  # the streams written, in order
        cap = self._buffer_events
        for index, item in enumerate(batch):
            if isinstance(item, _Anchor):
                pipe.xinfo_stream(self._prefix + item.conversation_id)
                anchors.append((index, item))
            else:
                keys[key := self._prefix + item[0]] = None
                pipe.xadd(key, {_FIELD: encode_event(item[1])}, maxlen=cap, approximate=True)
        for key in keys:
            pipe.pexpire(key, self._retain_ms)
        replies = await pipe.execute(raise_on_error=False)
        for index, anchor in anchors:
            info = replies[index]
            if isinstance(info, ResponseError):
                position = _NO_STREAM  # no such key
            elif isinstance(info, Exception):
                raise info
            else:
                position = (info["last-generated-id"], int(info.get("entries-added", 0)))
            if not anchor.future.done():
                anchor.future.set_result(position)
        skip = {index for index, _ in anchors}
        for index, reply in enumerate(replies):
            if isinstance(reply, Exception) and index not in skip:
                raise reply  # the batch's other events were written

    def _write_failed(self, batch: list[_Item], exc: Exception) -> None:
        _fail_anchors(batch, UnavailableError(f"live event bus: Redis at {self._where} failed"))
        if not self._failing:
            self._failing = True
            _log.warning(
                "live event bus: Redis write failed, dropping events until it answers",
                redis=self._where,
                error=f"{type(exc).__name__}: {exc}",
                dropped=sum(not isinstance(item, _Anchor) for item in batch),
            )

    def _resolve_flushes(self) -> None:
        waiting = []
        for target, future in self._flushes:
            if self._done < target:
                waiting.append((target, future))
            elif not future.done():
                future.set_result(None)
        self._flushes = waiting

    def _drop_queue(self) -> None:
        _fail_anchors(self._queue, UnavailableError("live event bus: closed"))
        self._queue.clear()
        self._queued = 0
        self._done = self._put
        self._resolve_flushes()


def _decoded(entry: dict[bytes, bytes]) -> LiveEvent | None:
    raw = entry.get(_FIELD)
    if raw is None:
        return None
    try:
        return decode_event(raw)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        _log.warning("live event bus: skipping an unreadable entry", error=str(exc))
        return None


def _fail_anchors(items: Iterable[_Item], error: UnavailableError) -> None:
    for item in items:
        if isinstance(item, _Anchor) and not item.future.done():
            item.future.set_exception(error)


def _retrieve(future: asyncio.Future[tuple[bytes, int]]) -> None:
    if not future.cancelled():
        future.exception()  # a follow() never iterated must not warn about it
