"""tokenwire.streams: taking what is ready without waiting, and cleanup that cancels cannot cut."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tokenwire.streams import Pending, finish_shielded, poll_next, start_now


async def _counting(delay_s: float, log: list[str]) -> AsyncIterator[int]:
    try:
        for i in range(3):
            if delay_s:
                await asyncio.sleep(delay_s)
            yield i
    finally:
        await asyncio.sleep(0)  # cleanup that waits, like an engine stopping a worker
        log.append("closed")


async def _ready() -> AsyncIterator[int]:
    for i in range(3):
        yield i


async def test_ready_items_are_taken_without_waiting() -> None:
    """A generator that never waits gives every item at once, then StopAsyncIteration."""
    stream = _ready()
    assert [(True, 0), (True, 1), (True, 2)] == [poll_next(stream) for _ in range(3)]
    with pytest.raises(StopAsyncIteration):
        poll_next(stream)


async def test_a_waiting_step_is_finished_by_awaiting_it() -> None:
    """An item that is not ready comes back as Pending; awaiting it gives the item."""
    stream = _counting(0.01, [])
    ready, pending = poll_next(stream)
    assert not ready
    assert isinstance(pending, Pending)
    assert 0 == await pending


async def test_an_abandoned_step_closes_the_stream_and_runs_its_cleanup() -> None:
    """Abandoning a started step runs the generator's cleanup; aclose() afterwards is a no-op."""
    log: list[str] = []
    stream = _counting(1.0, log)
    _, pending = poll_next(stream)
    assert isinstance(pending, Pending)
    await pending.abandon()
    await stream.aclose()
    assert ["closed"] == log


class _FutureIterator:
    """An async iterator that is not a generator: __anext__ returns a plain Future."""

    def __init__(self) -> None:
        self.future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def __aiter__(self) -> _FutureIterator:
        return self

    def __anext__(self) -> asyncio.Future[int]:
        return self.future


async def test_any_async_iterator_can_be_polled() -> None:
    """An __anext__ that returns a Future works too: pending first, the value once set."""
    stream = _FutureIterator()
    ready, pending = poll_next(stream)
    assert not ready
    stream.future.set_result(7)
    assert isinstance(pending, Pending)
    assert 7 == await pending


async def test_a_timeout_inside_shielded_work_applies_to_the_work() -> None:
    """Work that sets its own timeout times out itself; the caller is not cancelled."""

    async def work() -> None:
        async with asyncio.timeout(0.05):
            await asyncio.sleep(5)

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await finish_shielded(work())
    assert loop.time() - started < 2


async def test_shielded_work_finishes_although_the_caller_is_cancelled() -> None:
    """A cancel arriving mid-work waits for the work, then is raised."""
    done: list[str] = []

    async def work() -> None:
        await asyncio.sleep(0.05)
        done.append("saved")

    task = asyncio.create_task(finish_shielded(work()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ["saved"] == done


async def test_start_now_finishes_what_never_waits_without_a_loop_turn() -> None:
    """A coroutine that does not suspend is done at once; one that does is finished by
    awaiting the pending step, even from another task; errors propagate at once."""

    async def value(wait: bool) -> int:
        if wait:
            await asyncio.sleep(0)
        return 7

    async def failing() -> None:
        raise ValueError("no")

    assert (True, 7) == start_now(value(False))
    ready, pending = start_now(value(True))
    assert not ready
    assert 7 == await asyncio.ensure_future(_await(pending))
    with pytest.raises(ValueError, match="no"):
        start_now(failing())


async def _await(pending: Any) -> Any:
    return await pending
