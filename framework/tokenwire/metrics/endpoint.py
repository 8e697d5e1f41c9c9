"""The metrics HTTP endpoint, and the engine gauges it shows.

:class:`MetricsEndpoint` serves ``/metrics`` (Prometheus text format) on
``metrics.listen`` from a thread of prometheus_client's, and refreshes the engine
gauges every second from what the backend reports: ``load()`` of an engine in this
process (``worker="local"``), or each worker's last report for the router.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``tokenwire serve --processes N``), the
first process serves the sum of every process's files; the others pass
``serve=False`` and only write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from typing import Any

from tokenwire.backend import LoadReport
from tokenwire.errors import ConfigError
from tokenwire.logs import get_logger
from tokenwire.metrics.config import MetricsConfig
from tokenwire.metrics.registry import Metrics

__all__ = ["MULTIPROCESS_ENV", "MetricsEndpoint", "engine_loads"]

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_REFRESH_S = 1.0
_log = get_logger("tokenwire.metrics")


def engine_loads(backend: object) -> Iterator[tuple[str, LoadReport, float | None]]:
    """(worker, load, prefix-cache hit rate or None) for the backend's engines."""
    fleet = getattr(backend, "fleet", None)
    if fleet is not None:  # the router: every worker's last report
        for key, state in list(fleet.workers.items()):
            yield key, state.load, None
        return
    load = getattr(backend, "load", None)
    if load is None:
        return
    lookups = getattr(backend, "prefix_cache_lookups", 0) or 0
    hits = getattr(backend, "prefix_cache_hits", 0) or 0
    yield "local", load(), (hits / lookups if lookups else None)


class MetricsEndpoint:
    """Serves ``metrics`` on ``config.listen`` and keeps the engine gauges fresh."""

    def __init__(
        self, config: MetricsConfig, metrics: Metrics, backend: object, *, serve: bool = True
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._backend = backend
        self._serve = serve
        self._httpd: Any = None
        self._refresh: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind the endpoint (a ConfigError if the address is taken) and start refreshing."""
        if self._serve:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = self.metrics.registry
            if os.environ.get(MULTIPROCESS_ENV):
                from prometheus_client import multiprocess

                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            host, _, port = self.config.listen.rpartition(":")
            try:
                self._httpd, _ = start_http_server(int(port), host or "0.0.0.0", registry)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"metrics.listen {self.config.listen!r}: {exc}") from exc
            self.port = int(self._httpd.server_port)
            _log.info("metrics served", address=f"{host}:{self.port}")
        self.refresh()
        self._refresh = asyncio.ensure_future(self._refresh_forever())

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
            self._refresh = None
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()

    def refresh(self) -> None:
        """Set the engine gauges from what the backend reports now."""
        m = self.metrics
        for worker, load, hit_rate in engine_loads(self._backend):
            m.engine_running.labels(worker).set(load.running)
            m.engine_queued.labels(worker).set(load.queued)
            m.engine_queued_tokens.labels(worker).set(load.queued_tokens)
            m.engine_kv.labels(worker).set(load.kv_cache_usage)
            m.engine_tps.labels(worker).set(load.tokens_per_second)
            if hit_rate is not None:
                m.prefix_hit_rate.labels(worker).set(hit_rate)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(_REFRESH_S)
            try:
                self.refresh()
            except Exception:  # a gauge is never worth the endpoint
                _log.exception("refreshing the engine gauges failed")
