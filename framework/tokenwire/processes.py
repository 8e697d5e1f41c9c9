"""``tokenwire serve --processes N``: N gateway processes sharing one port.

A Python process streams a few tens of thousands of messages a second, so a gateway
scales by processes, not threads: each process is a whole :class:`TokenwireServer`
bound to the same port with ``SO_REUSEPORT`` (the kernel spreads connections), and
they share what must be shared through the configured stores (conversations in
SQLite or PostgreSQL, quotas and live events in Redis: with the in-memory quota
store each process counts on its own). With ``[router] workers`` set, every process
routes to the same workers; without, each loads its own in-process engine.

The first process starts alone (it creates the admin key on a first start), then
starts the others; SIGTERM or SIGINT to it drains them all.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
import sys
import tempfile
from collections.abc import Mapping

from tokenwire.config import load_config
from tokenwire.errors import ConfigError
from tokenwire.logs import configure_logging, get_logger
from tokenwire.metrics.endpoint import MULTIPROCESS_ENV
from tokenwire.server import TokenwireServer
from tokenwire.signals import until_stop_signal

__all__ = ["serve_processes"]

_log = get_logger("tokenwire.processes")
_PR_SET_PDEATHSIG = 1


def _child(config_file: str | None, overrides: dict[str, str]) -> None:
    _end_with_parent()
    config = load_config(config_file, overrides=overrides)
    configure_logging(config.logging)
    # The first process serves the metrics of all (PROMETHEUS_MULTIPROC_DIR, inherited).
    asyncio.run(TokenwireServer(config, serve_metrics=False).serve())


async def serve_processes(
    config_file: str | None, overrides: Mapping[str, str], processes: int
) -> None:
    """Serve the configuration of ``config_file`` and ``overrides`` (each process reads
    it, environment included) from ``processes`` processes on one port until
    SIGTERM/SIGINT."""
    if processes < 1:
        raise ConfigError(f"--processes must be >= 1, got {processes}")
    settings = dict(overrides)
    if processes > 1:
        settings["server.reuse_port"] = "true"
    config = load_config(config_file, overrides=settings)
    configure_logging(config.logging)
    if processes > 1 and config.server.listen.rsplit(":", 1)[-1] == "0":
        raise ConfigError("--processes needs a fixed port: processes cannot share port 0")
    metrics_dir = None
    if processes > 1 and config.metrics.enabled and not os.environ.get(MULTIPROCESS_ENV):
        # Every process writes its metrics here; the first serves their sum. Set before
        # any metric exists, and inherited by the children.
        metrics_dir = tempfile.TemporaryDirectory(prefix="tokenwire-metrics-")
        os.environ[MULTIPROCESS_ENV] = metrics_dir.name
    server = TokenwireServer(config)
    await server.start()
    context = multiprocessing.get_context("spawn")  # no inherited event loop or gRPC state
    # The HTTP edge binds its own port without SO_REUSEPORT: the first process serves it
    # (its calls reach that process's gRPC server), the others serve gRPC only.
    child_settings = {**settings, "http.enabled": "false"}
    children = [
        context.Process(target=_child, args=(config_file, child_settings))
        for _ in range(processes - 1)
    ]
    try:
        for child in children:
            child.start()
        if children:
            _log.info("gateway processes", processes=processes, address=server.address)
        await until_stop_signal()
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()  # SIGTERM: each drains as this one does
        await server.stop()
        for child in children:
            if child.pid is None:
                continue  # never started
            await asyncio.to_thread(child.join, config.server.grace_period_s + 10)
            if child.is_alive():
                child.kill()
        if metrics_dir is not None:
            metrics_dir.cleanup()


def _end_with_parent() -> None:
    """On Linux, have the kernel send SIGTERM when the first process dies, however it
    dies (SIGKILL included), so no gateway process outlives it holding the port."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        _log.warning("cannot tie this gateway process to its parent's lifetime")
