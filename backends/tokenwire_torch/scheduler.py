"""The torch engine's batching path: slots, the prefix cache, and the step loop.

:class:`SlotScheduler` owns the cache rows (slots) of a :class:`Batcher`. It
places each admitted request in a free slot (the one whose cached tokens share
the longest prefix with its prompt, within the same cache scope), runs one
batched step at a time on the engine's worker thread while any request is
admitted, hands each request its tokens, and frees a slot the step after its
request finished or was cancelled, keeping the slot's keys for a later request
of the same scope that starts the same way::

    scheduler = SlotScheduler(batcher, executor, admitted_set, prefix_cache=True)
    scheduler.place(admitted, prompt)  # on admission, no await
    scheduler.wake()                   # make sure the step loop runs
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import deque
from concurrent.futures import Executor

from tokenwire.backend import FinishReason, common_prefix
from tokenwire.errors import UnavailableError
from tokenwire_torch.admitted import Admitted, Phase
from tokenwire_torch.batching import Batcher

__all__ = ["MIN_PREFIX", "SlotScheduler"]

MIN_PREFIX = 16
"""A cached prefix shorter than this is not worth picking a slot for."""

_log = logging.getLogger("tokenwire_torch")


class SlotScheduler:
    """Continuous batching over ``batcher``'s slots for the requests in ``admitted``
    (the engine's set of live requests, which this removes them from when done)."""

    def __init__(
        self,
        batcher: Batcher,
        executor: Executor,
        admitted: set[Admitted],
        *,
        prefix_cache: bool,
        recent_steps: deque[tuple[float, float]],
    ) -> None:
        self.batcher = batcher
        self.prefix_hits = 0  # prompt tokens whose keys came from the cache
        self.prompt_tokens = 0  # prompt tokens of every admitted request
        self.steps_executed = 0  # forward passes
        self._executor = executor
        self._live = admitted
        self._prefix_cache = prefix_cache
        self._recent_steps = recent_steps
        self._free = list(range(batcher.llama.slots))  # freed longest ago first
        # free slot → (its last request's cache scope, the tokens whose keys it holds)
        self._held: dict[int, tuple[str, list[int]]] = {}
        self._order: list[Admitted] = []  # batched requests, oldest first
        self._task: asyncio.Task[None] | None = None

    @property
    def context_length(self) -> int:
        """Prompt plus answer that one slot holds."""
        return self.batcher.llama.max_len

    def place(self, admitted: Admitted, prompt: list[int]) -> None:
        """Give ``admitted`` a slot and its row (no await: admission stays atomic)."""
        request = admitted.request
        shared = request.shared_prefix_tokens
        slot, reuse = self._pick_slot(prompt, request.cache_scope, shared)
        source, copied = self._shared_source(prompt, min(shared, len(prompt) - 1), slot)
        if copied > max(reuse, MIN_PREFIX - 1):
            reuse = copied
        else:
            source = -1
        admitted.row = self.batcher.new_row(slot, prompt, request.sampling, reuse, source)
        self.prefix_hits += reuse
        self.prompt_tokens += len(prompt)
        self._order.append(admitted)

    def wake(self) -> None:
        """Run the step loop if it is not running."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tokenwire-torch")

    async def _run(self) -> None:
        """Step every placed request together until none is left (see ``batching``)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                for admitted in [a for a in self._live if a.cancelled and a.row is not None]:
                    self.release(admitted)
                # Admission order: the oldest prompt is prefilled first.
                active = [a for a in self._order if a in self._live]
                self._order = active
                if not active:
                    return
                rows = [a.row for a in active if a.row is not None]
                began = time.monotonic()
                self.steps_executed += await loop.run_in_executor(
                    self._executor, self.batcher.step, rows
                )
                self._deliver(active, began, time.monotonic())
        except Exception as exc:
            _log.exception("torch batch step failed")
            traceback.clear_frames(exc.__traceback__)
            for admitted in [a for a in self._live if a.row is not None]:
                admitted.error = exc
                self.release(admitted)
        finally:
            self._task = None
            if any(a.row is not None for a in self._live):  # placed during the exit
                self.wake()

    def _deliver(self, active: list[Admitted], began: float, ended: float) -> None:
        for admitted in active:
            row = admitted.row
            if admitted.cancelled or row is None:
                continue
            for token in row.tokens:
                admitted.phase = Phase.RUNNING
                self._recent_steps.append((began, ended))
                if token in admitted.stop_token_ids:
                    admitted.finish_reason = FinishReason.STOP
                else:
                    admitted.pending.append(token)
                    admitted.completion_tokens += 1
                    if admitted.completion_tokens >= admitted.limit:
                        admitted.finish_reason = FinishReason.LENGTH
            if admitted.finish_reason is not None:
                self.release(admitted)
            elif row.tokens:
                admitted.ready.set()

    def _pick_slot(self, prompt: list[int], scope: str, shared: int) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest usable prefix with
        ``prompt`` (and how many to reuse): all of it within the same cache scope, at
        most the first ``shared`` tokens (the part every conversation has) from another
        scope's slot; without a useful one, the slot freed longest ago. See
        GenerateRequest.cache_scope."""
        best, reuse = self._free[0], 0
        for slot in self._free if scope or shared else ():
            held_scope, tokens = self._held.get(slot, ("", []))
            length = common_prefix(tokens, prompt)
            if not (scope and held_scope == scope):
                length = min(length, shared)
            if length > reuse:
                best, reuse = slot, length
        if reuse < MIN_PREFIX:
            best, reuse = self._free[0], 0  # oldest first: recent prefixes stay longest
        self._free.remove(best)
        self._held.pop(best, None)
        return best, min(reuse, len(prompt) - 1)

    def _shared_source(self, prompt: list[int], shared: int, target: int) -> tuple[int, int]:
        """A slot (running or free) whose first keys are the first ``shared`` tokens of
        ``prompt``, the part every conversation has, and how many match; (-1, 0)
        without one. Those keys stay put until a later step: a running row writes
        only past them, and a free slot is written only after the copy."""
        best, length = -1, 0
        if shared < MIN_PREFIX or not self._prefix_cache:
            return best, length
        holders = [(slot, tokens) for slot, (_, tokens) in self._held.items()]
        live = [a.row for a in self._order if a in self._live and a.row is not None]
        holders += [(row.slot, row.cached) for row in live]
        for slot, tokens in holders:
            if slot == target:
                continue
            matched = min(common_prefix(tokens, prompt), shared)
            if matched > length:
                best, length = slot, matched
                if length == shared:
                    break
        return best, length

    def release(self, admitted: Admitted) -> None:
        """Take a request out: its slot is free for the next one at once, and keeps its
        tokens' keys for a request of the same scope that starts the same way."""
        if admitted not in self._live:
            return
        self._live.discard(admitted)
        row = admitted.row
        if row is not None:
            self._free.append(row.slot)
            # A failed step may have left its keys half written: not worth keeping.
            if admitted.error is None and self._prefix_cache:
                self._held[row.slot] = (admitted.request.cache_scope, row.cached)
        if admitted.finish_reason is None and admitted.error is None:
            admitted.error = UnavailableError("generation stopped before it finished")
        admitted.ready.set()
        if admitted.producer is not None and not admitted.producer.done():
            admitted.producer.set_result(None)
