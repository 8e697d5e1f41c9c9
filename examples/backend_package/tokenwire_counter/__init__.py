"""An example Tokenwire engine: it answers every prompt by counting, "1 2 3 4 ...".

Its token ids are UTF-8 bytes (``TokenizerSource(kind="bytes")``), so it needs no
model files: the gateway's byte tokenizer templates the prompt and decodes the
answer. Small as it is, it keeps the whole engine contract: ``max_tokens`` ends an
answer with LENGTH, a stop token id ends it with STOP (and is not sent), a
consumer that stops reading stops the work at the next step, and ``load()``
counts what runs. Serve it with ``tokenwire serve --backend counter``, or::

    [backend]
    name = "counter"
    options = { step_ms = "20" }   # one token every 20 ms, like a small model on a CPU
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Iterator

from tokenwire.backend import (
    BackendConfig,
    Capabilities,
    Chunk,
    FinishReason,
    GenerateRequest,
    LoadReport,
    TokenizerSource,
)

__all__ = ["CountingEngine", "create_engine"]


def _counting(start: int) -> Iterator[int]:
    """The bytes of "start start+1 start+2 ...", for ever."""
    for number in itertools.count(start):
        yield from f"{number} ".encode()


class CountingEngine:
    """Counts from 1 (greedy), or from a number drawn from the seed (temperature > 0)."""

    def __init__(self, step_s: float = 0.001, max_batch: int = 8) -> None:
        self.step_s = step_s
        self.capabilities = Capabilities(
            model="counter",
            context_length=4096,
            max_batch=max_batch,  # the gateway admits at most this many answers at once
            tokenizer=TokenizerSource(kind="bytes"),
        )
        self.running = 0
        self.steps_executed = 0  # lets the conformance suite check that no step follows a stop

    async def start(self) -> None:
        """Nothing to load: a real engine loads its weights here, never in the factory."""

    async def close(self) -> None:
        """Nothing to release."""

    def load(self) -> LoadReport:
        return LoadReport(
            running=self.running, kv_cache_usage=self.running / self.capabilities.max_batch
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        sampling = request.sampling
        rng = random.Random(sampling.seed)  # the same seed, the same answer
        start = 1 if sampling.temperature == 0 else rng.randrange(1, 1000)
        sent, reason = 0, FinishReason.LENGTH
        self.running += 1
        try:  # aclose() or a cancelled task arrives at the yield or the await below
            for token in _counting(start):
                if sent == request.max_tokens:
                    break
                await asyncio.sleep(self.step_s)  # one decode step: other streams run meanwhile
                self.steps_executed += 1
                if token in request.stop_token_ids:
                    reason = FinishReason.STOP
                    break
                sent += 1
                yield Chunk((token,))
        finally:
            self.running -= 1  # freed before the final chunk: nothing is held once it is sent
        yield Chunk((), reason, len(request.prompt_token_ids), sent)


def create_engine(config: BackendConfig) -> CountingEngine:
    """The ``counter`` entry point; ``backend.options`` may set ``step_ms`` (default 1)."""
    return CountingEngine(float(config.options.get("step_ms", "1")) / 1000, config.max_running)
