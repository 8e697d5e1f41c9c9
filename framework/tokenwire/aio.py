"""Small asyncio helpers for streams that must end cleanly, cancelled or not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from tokenwire.logs import get_logger

__all__ = ["closing", "finish_shielded"]

T = TypeVar("T")
_log = get_logger("tokenwire.aio")


@contextlib.asynccontextmanager
async def closing(stream: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close ``stream`` on exit if it can be closed (async generators can).

    The producer behind it then stops at once, not whenever the abandoned generator
    is garbage collected. When the block exits with an error (a cancel included), a
    failure while closing is logged and the original error propagates.
    """
    aclose = getattr(stream, "aclose", None)
    try:
        yield stream
    except BaseException:
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                _log.exception("closing a stream after an error failed")
        raise
    if aclose is not None:
        await aclose()


async def finish_shielded(work: Awaitable[T]) -> T:
    """Run ``work`` to its end even if the caller is cancelled, once or many times.

    The cancellation is re-raised after ``work`` finished, so cleanup that must not be
    cut short (saving what a client saw, settling a quota) completes before the
    caller's own cleanup continues.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()
