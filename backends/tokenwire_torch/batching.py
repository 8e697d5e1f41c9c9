"""Continuous batching for the torch engine, over the own Llama forward pass.

One scheduler task per engine loops while requests are admitted. Each round it
drops what was cancelled or finished (freeing its cache slot), then runs one
step on the engine's worker thread:

* the next prompt chunks of the requests still reading their prompts (oldest
  first), ``prefill_chunk`` tokens in all, in one forward pass, so new prompts
  delay running streams by at most that much prefill per step;
* one token for every request past its prompt, all in one batched forward.

Requests join and leave the batch at any step. Each samples with its own
settings and its own seeded generator, so a seeded answer does not depend on
its batch mates; greedy ones take the argmax of their own row::

    batcher = Batcher(llama, prefill_chunk=256, small_step_rows=4)
    row = batcher.new_row(slot, prompt_ids, sampling)  # a request's place
    batcher.step(rows)              # on the worker thread: sets each row's tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenwire.backend import SamplingParams
from tokenwire_torch.llama import LlamaForward
from tokenwire_torch.sampling import sample_next_token

__all__ = ["Batcher", "Row"]


@dataclass(eq=False)
class Row:
    """One request's place in the batch: its cache slot and how far it has come."""

    slot: int
    prompt: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None
    position: int = 0  # tokens already in the cache
    last: int = -1  # the token to feed next (after the prompt)
    tokens: list[int] = field(default_factory=list)  # produced by the last step, if any
    cached: list[int] = field(default_factory=list)  # the tokens whose keys the slot holds
    copy_from: int = -1  # a slot whose first ``position`` keys to copy in before the step

    @property
    def prefilling(self) -> bool:
        return self.position < len(self.prompt)


class Batcher:
    """Runs batched steps of :class:`LlamaForward` (on one thread only)."""

    def __init__(
        self, llama: LlamaForward, *, prefill_chunk: int = 256, small_step_rows: int = 0
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if small_step_rows < 0:
            raise ValueError("small_step_rows must be >= 0")
        self.llama = llama
        self.prefill_chunk = prefill_chunk
        # Decode steps of at most ``small_step_rows`` rows run on one CPU thread fewer
        # than the rest (at least one): the core left over runs the event loop that
        # streams their tokens meanwhile, where it would otherwise take a core from
        # the thread team, which then stalls at every op's barrier; and small steps
        # gain little from more threads. Read here, on the thread that runs steps
        # (OpenMP keeps the setting per thread).
        self.small_step_rows = small_step_rows if llama.device.type == "cpu" else 0
        self.threads = torch.get_num_threads()
        self.small_step_threads = max(1, self.threads - 1)

    def new_row(
        self,
        slot: int,
        prompt: list[int],
        sampling: SamplingParams,
        reuse: int = 0,
        copy_from: int = -1,
    ) -> Row:
        """A request's row in ``slot``, whose first ``reuse`` prompt tokens the slot
        already holds (a prefix cached from an earlier request), or slot ``copy_from``
        holds, to be copied in before the row's first step; its RNG is seeded from
        ``sampling.seed``."""
        if not 0 <= reuse < len(prompt):
            raise ValueError("reuse must leave at least one prompt token to run")
        generator: torch.Generator | None = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.llama.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
        return Row(
            slot,
            prompt,
            sampling,
            generator,
            position=reuse,
            cached=prompt[:reuse],
            copy_from=copy_from,
        )

    def step(self, rows: list[Row]) -> int:
        """One step over ``rows``: prompt chunks of the oldest still prefilling (up to
        ``prefill_chunk`` tokens in all), and a token for each past its prompt. Sets
        each row's ``tokens`` (one new token, or none); returns the forward passes run."""
        for row in rows:
            row.tokens = []
            if row.copy_from >= 0:  # before any write of this step: the keys are still there
                self.llama.copy_prefix(row.copy_from, row.slot, row.position)
                row.copy_from = -1
        passes = 0
        # By slot: consecutive slots are read as one view of the cache, without a copy.
        decoding = sorted((row for row in rows if not row.prefilling), key=lambda r: r.slot)
        # Prompt chunks of the oldest prefilling requests, ``prefill_chunk`` tokens in all,
        # in one pass: a step delays the running streams by at most that much prefill.
        budget, prefill = self.prefill_chunk, []
        for row in rows:
            if row.prefilling and budget > 0:
                size = min(len(row.prompt) - row.position, budget)
                prefill.append((row, row.prompt[row.position : row.position + size]))
                budget -= size
        if prefill:
            self._use_threads(self.threads)
            width = max(len(chunk) for _, chunk in prefill)
            room = self.llama.max_len
            fits = [(r, c) for r, c in prefill if r.position + width <= room]
            alone = [(r, c) for r, c in prefill if r.position + width > room]
            if fits:
                passes += self._prefill(fits)
            for single in alone:  # near the cache's end: no room for the padding
                passes += self._prefill([single])
        if decoding:
            small = len(decoding) <= self.small_step_rows
            self._use_threads(self.small_step_threads if small else self.threads)
            logits = self.llama.forward(
                [row.slot for row in decoding],
                [[row.last] for row in decoding],
                [row.position for row in decoding],
            )
            passes += 1
            # Greedy rows take the argmax: one call for the whole batch.
            best = logits.argmax(-1).tolist()
            for index, row in enumerate(decoding):
                row.position += 1
                row.cached.append(row.last)
                self._take(row, logits[index], best[index])
        return passes

    def _use_threads(self, count: int) -> None:
        if self.small_step_rows and torch.get_num_threads() != count:
            torch.set_num_threads(count)

    def _prefill(self, group: list[tuple[Row, list[int]]]) -> int:
        logits = self.llama.forward(
            [row.slot for row, _ in group],
            [chunk for _, chunk in group],
            [row.position for row, _ in group],
        )
        for index, (row, chunk) in enumerate(group):
            row.position += len(chunk)
            row.cached += chunk
            if not row.prefilling:  # the prompt is in: its first token
                self._take(row, logits[index])
        return 1

    @staticmethod
    def _take(row: Row, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample ``row``'s next token; ``greedy``: the row's argmax, if known."""
        if greedy is not None and row.sampling.temperature <= 0:
            token = greedy
        else:
            token = sample_next_token(logits, row.sampling, row.generator)
        row.last = token
        row.tokens = [token]
