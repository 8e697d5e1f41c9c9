"""Flag events written to the conversation database in the background, in batches.

:meth:`FlagEventLog.add` is called on the event loop for every flag, mid-turn: it
appends the event to a list and returns. A writer task wakes a few milliseconds
later and writes everything that gathered meanwhile in one transaction per
batch, so a burst of flags costs one write, and the turn never waits for one. A
write that fails is logged and its events are dropped (the audit log still has
every flag); at most ``max_pending`` events wait, the oldest dropped beyond.

    log = FlagEventLog(store)           # a ModerationEventStore
    log.add(event)                      # from FlagSink.flagged
    await log.close()                   # writes what is still pending
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from tokenwire.errors import FailedPreconditionError
from tokenwire.logs import get_logger
from tokenwire.moderation.actions import FlagEvent
from tokenwire.stores.conversations import Page, new_id
from tokenwire.stores.moderation_events import (
    ModerationEventQuery,
    ModerationEventRecord,
    ModerationEventStore,
)

__all__ = ["FlagEventLog", "event_record"]

_log = get_logger("tokenwire.abuse")
_GATHER_S: Final = 0.005  # how long the writer waits for more events to join a batch
_BATCH: Final = 500  # most events in one transaction


def event_record(event: FlagEvent, recorded_at: float) -> ModerationEventRecord:
    """The stored form of ``event``; its text only when the tenant keeps it."""
    return ModerationEventRecord(
        new_id("flag"),
        recorded_at,
        event.principal.tenant,
        event.principal.user,
        event.turn_id,
        event.direction,
        event.category,
        event.moderator,
        float(event.score),
        event.action,
        event.text if event.keep_text else "",
    )


class FlagEventLog:
    """Keeps flag events in ``store`` (None: kept nowhere, and listing is
    FAILED_PRECONDITION); ``clock`` gives unix seconds."""

    def __init__(
        self,
        store: ModerationEventStore | None,
        *,
        max_pending: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._max_pending = max_pending
        self._clock = clock
        self._pending: list[ModerationEventRecord] = []
        self._writer: asyncio.Task[None] | None = None
        self._dropped = 0
        self._closed = False

    def add(self, event: FlagEvent) -> None:
        """Queue ``event`` for the next batch; never waits, never raises."""
        if self.store is None or self._closed:
            return
        if len(self._pending) >= self._max_pending:
            del self._pending[0]
            self._dropped += 1
        self._pending.append(event_record(event, self._clock()))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_soon())

    async def flush(self) -> None:
        """Until everything added so far is written (or dropped, failing)."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def close(self) -> None:
        """Write what is pending; later events are not kept."""
        await self.flush()
        self._closed = True

    async def list(self, query: ModerationEventQuery) -> Page[ModerationEventRecord]:
        """A page of kept events, newest first (pending ones written first)."""
        if self.store is None:
            raise FailedPreconditionError(
                "this server keeps no moderation events: its conversation store does not"
            )
        await self.flush()
        return await self.store.list_moderation_events(query)

    async def _write_soon(self) -> None:
        try:
            await asyncio.sleep(_GATHER_S)
            while self._pending and self.store is not None:
                batch = self._pending[:_BATCH]
                del self._pending[:_BATCH]
                try:
                    await self.store.record_moderation_events(batch)
                except Exception as exc:  # any store failure: the turn must not notice
                    _log.warning(
                        "writing moderation events failed; they are dropped",
                        events=len(batch),
                        error=f"{type(exc).__name__}: {exc}",
                    )
            if self._dropped:
                _log.warning("moderation events dropped: too many pending", events=self._dropped)
                self._dropped = 0
        finally:
            self._writer = None
