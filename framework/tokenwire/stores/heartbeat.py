"""A gateway's heartbeat: the background task that tells a shared store it is alive.

Every store instance is one gateway with an id of its own. Its running turns
hold their conversations only while it beats: a turn whose gateway has not
beaten for ``gateway_timeout_s`` is dead (its process crashed or lost the
database), and the next turn of its conversation ends it. The beat itself is
the store's business (a row in its ``gateways`` table); this task only calls
it every ``interval_s`` seconds, logs failures and keeps going::

    heartbeat = Heartbeat(store.beat, interval_s=2.0)
    heartbeat.start()
    ...
    await heartbeat.stop()
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tokenwire.logs import get_logger

__all__ = ["Heartbeat", "check_timings"]

_log = get_logger("tokenwire.stores")


def check_timings(
    *, heartbeat_s: float, gateway_timeout_s: float, idempotency_ttl_s: float
) -> None:
    """ValueError unless every timing is a positive number of seconds."""
    for name, value in (
        ("heartbeat_s", heartbeat_s),
        ("gateway_timeout_s", gateway_timeout_s),
        ("idempotency_ttl_s", idempotency_ttl_s),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


class Heartbeat:
    """Calls ``beat`` every ``interval_s`` seconds until stopped; a failed beat is
    logged and the next one tried on time."""

    def __init__(self, beat: Callable[[], Awaitable[None]], *, interval_s: float) -> None:
        self._beat = beat
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start beating (the first beat after one interval: the caller beats at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tokenwire-store-heartbeat")

    async def stop(self) -> None:
        """Stop beating and wait until the task is gone. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # wait(), not `await task`: the task's cancellation is not the caller's.
        await asyncio.wait({task})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._beat()
            except Exception:
                _log.exception("store heartbeat failed; trying again next interval")
