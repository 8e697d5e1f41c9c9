"""Turns that outlive their call: a turn sent with an idempotency key keeps going when
its client drops, so the retry that client sends (to any gateway) attaches to it and
gets the whole answer once (see :mod:`tokenwire.turns.replay`).

A turn without a key is bound to its call, as before: the client leaving cancels it.
``CancelTurn`` cancels a keyed turn too. The server cancels what is still running
when it shuts down, after the grace period::

    keeper = Detached()
    responses = keeper.stream(runner.run(request, call, events))   # for Complete
    keeper.keep(task)                                              # for a Converse turn
    await keeper.finish(grace_s)                                   # at shutdown
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Final, TypeVar

__all__ = ["Detached"]

Out = TypeVar("Out")
_END: Final = object()
_QUEUE_MESSAGES: Final = 16  # messages a keyed Complete keeps for a slow reader


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Detached:
    """The keyed turns running on without (or beyond) their call."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._by_turn: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def keep(self, task: asyncio.Task[None], turn_id: str = "") -> None:
        """Hold ``task`` (turn ``turn_id``'s) until it ends, and cancel it at shutdown."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if turn_id:
            self._by_turn[turn_id] = task
            task.add_done_callback(lambda _: self._by_turn.pop(turn_id, None))

    def cancel(self, turn_id: str) -> bool:
        """Cancel turn ``turn_id`` if it runs on here (a CancelTurn sent to its retry)."""
        task = self._by_turn.get(turn_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def stream(
        self, responses: AsyncGenerator[Out, None], turn_id: str = ""
    ) -> AsyncGenerator[Out, None]:
        """``responses`` as they come, produced by a task of their own that goes on to
        the turn's end when the consumer stops early (the answer is stored either way).

        At most a few messages wait for a slow consumer; then the turn waits too.
        """
        # Bounded: a client that reads slowly holds its turn back (which then merges
        # what is waiting into fewer messages), as it would without the detour.
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=_QUEUE_MESSAGES)
        listening = True

        async def pump() -> None:
            try:
                async for item in responses:
                    if listening:
                        await queue.put(item)
            except BaseException as exc:
                if listening:
                    await queue.put(_Failure(exc))
                if not isinstance(exc, Exception):
                    raise
            else:
                if listening:
                    await queue.put(_END)

        self.keep(asyncio.create_task(pump()), turn_id)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, _Failure):
                    raise item.error
                yield item  # type: ignore[misc]
        finally:
            listening = False  # the call ended: the turn goes on, unheard
            while not queue.empty():  # a put waiting for room goes on
                queue.get_nowait()

    async def finish(self, grace_s: float) -> None:
        """Give the kept turns ``grace_s`` to end, then cancel the rest and wait until
        each has stored what it sent."""
        tasks = list(self._tasks)
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
