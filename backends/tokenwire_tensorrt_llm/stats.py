"""The runtime's iteration stats, polled in the background for ``load()``.

``LLM.get_stats_async(timeout)`` (NVIDIA/TensorRT-LLM ``tensorrt_llm/llmapi/llm.py``)
returns an ``IterationResult`` (``tensorrt_llm/executor/result.py``): an async
iterable of one dict per engine iteration that ends once ``timeout`` seconds
pass without a new one, and stays ended until the next request is submitted.
The fields read here are the ones TensorRT-LLM's own Prometheus collector reads
(``tensorrt_llm/metrics/collector.py``): ``numQueuedRequests``,
``inflightBatchingStats.numPausedRequests`` and ``kvCacheStats``'s
``usedNumBlocks``, ``freeNumBlocks`` and ``maxNumBlocks``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["RuntimeStats", "poll_stats"]

_log = logging.getLogger("tokenwire_tensorrt_llm")


class RuntimeStats:
    """The latest iteration's numbers, as the router needs them."""

    def __init__(self) -> None:
        self.iterations = 0  # stats records seen so far
        self.queued = 0
        self.kv_cache_usage = 0.0

    def absorb(self, stats: Mapping[str, Any]) -> None:
        """Take in one iteration's stats dict; missing fields keep their last value."""
        self.iterations += 1
        batching = stats.get("inflightBatchingStats")
        paused = _count(batching.get("numPausedRequests"), 0) if isinstance(batching, dict) else 0
        # Paused requests were preempted for KV-cache room: they wait, as queued ones do.
        self.queued = _count(stats.get("numQueuedRequests"), self.queued) + paused
        kv = stats.get("kvCacheStats")
        if isinstance(kv, dict):
            most = _count(kv.get("maxNumBlocks"), 0)
            used = kv.get("usedNumBlocks")
            if used is None and "freeNumBlocks" in kv:
                used = most - _count(kv.get("freeNumBlocks"), most)
            if most > 0:
                self.kv_cache_usage = min(1.0, max(0.0, _count(used, 0) / most))


async def poll_stats(
    get_stats_async: Callable[..., Any],
    stats: RuntimeStats,
    interval_s: float,
    submitted: asyncio.Event,
) -> None:
    """Feed ``stats`` from ``get_stats_async`` until cancelled.

    Waits for the first request (before it the runtime has no stats to give and
    says so on every call), then drains whatever iterations are ready every
    ``interval_s``. A failing read is logged once and retried.
    """
    await submitted.wait()
    warned = False
    while True:
        try:
            async for record in get_stats_async(timeout=interval_s):
                if isinstance(record, dict):
                    stats.absorb(record)
        except asyncio.CancelledError:
            raise
        except Exception:
            if not warned:
                _log.warning("reading TensorRT-LLM iteration stats failed", exc_info=True)
                warned = True
        await asyncio.sleep(interval_s)


def _count(value: object, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return max(0, int(value))
