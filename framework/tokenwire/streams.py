"""Small asyncio helpers for streams: end cleanly, cancelled or not; take what is ready."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Coroutine, Generator
from typing import Any, Generic, TypeVar

from tokenwire.logs import get_logger

__all__ = ["Pending", "closing", "finish_shielded", "poll_next", "start_now", "wait_set"]

T = TypeVar("T")
_log = get_logger("tokenwire.streams")


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


async def finish_shielded(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to its end even if the caller is cancelled, once or many times.

    The cancellation is re-raised after ``work`` finished, so cleanup that must not be
    cut short (saving what a client saw, settling a quota) completes before the
    caller's own cleanup continues. ``work`` runs in a task of its own from its first
    step, so timeouts it sets apply to it, not to the caller.
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


def poll_next(stream: AsyncIterator[T]) -> tuple[bool, T | Pending[T]]:
    """Take ``stream``'s next item if it is ready now, without waiting for it.

    Returns ``(True, item)`` when the step finished without suspending, else
    ``(False, pending)``: the step has started and ``await pending`` finishes it
    (exactly as ``await anext(stream)`` would have). A started step must be
    awaited or :meth:`Pending.abandon`-ed before the stream is closed.
    ``StopAsyncIteration`` and the stream's own errors propagate.

    This is how a consumer that runs behind its producer merges what is already
    there into one message, at no cost when it keeps up.
    """
    # __await__(): an async generator's step is its own iterator; any other
    # awaitable (a Future, a coroutine) gives one.
    step = stream.__anext__().__await__()
    try:
        yielded = step.send(None)
    except StopIteration as done:
        return True, done.value
    return False, Pending(step, yielded)


def start_now(awaitable: Awaitable[T]) -> tuple[bool, T | Pending[T]]:
    """Run ``awaitable`` until it first suspends, here and now, as ``await`` would.

    Returns ``(True, result)`` when it finished without suspending (no loop turn
    spent, no task made), else ``(False, pending)``: ``await pending`` finishes it,
    from this task or another one. Its errors propagate.

    A store call that usually completes inline costs nothing extra this way, and
    only one that had to wait needs a task (to shield it from a cancel, say).
    """
    step = awaitable.__await__()
    try:
        yielded = step.send(None)
    except StopIteration as done:
        return True, done.value
    return False, Pending(step, yielded)


class Pending(Generic[T]):
    """A started ``__anext__`` step of an async iterator; see :func:`poll_next`."""

    __slots__ = ("_step", "_yielded")

    def __init__(self, step: Any, yielded: Any) -> None:
        self._step = step
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, T]:
        # What the step yielded (a future, or None for a bare yield) goes to the task
        # that awaits us, exactly as if the step itself were awaited; what the task
        # sends or throws back goes on into the step.
        yielded = self._yielded
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # a cancel, thrown into the awaiting task
                try:
                    yielded = self._step.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                continue
            try:
                yielded = self._step.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    async def abandon(self) -> None:
        """Give up the step: the stream is closed from inside it (its cleanup runs).

        Afterwards ``aclose()`` on the stream does nothing. Errors of the cleanup
        are logged, not raised.
        """
        try:
            yielded = self._step.throw(GeneratorExit)
        except (GeneratorExit, StopIteration, StopAsyncIteration):
            return
        except RuntimeError:  # the step already ended (it was awaited): nothing to undo
            return
        except Exception:
            _log.exception("closing a stream in the middle of a step failed")
            return
        # The stream's cleanup awaits (a worker to stop, say): run it to its end.
        self._yielded = yielded
        try:
            await self
        except (GeneratorExit, StopAsyncIteration):
            pass
        except Exception:
            _log.exception("closing a stream in the middle of a step failed")


async def wait_set(event: asyncio.Event, limit_s: float) -> bool:
    """Wait until ``event`` is set; False if ``limit_s`` passes first."""
    try:
        await asyncio.wait_for(event.wait(), limit_s)
    except TimeoutError:
        return False
    return True
