"""Waiting for the signals that stop a server: SIGTERM (orchestrators) and SIGINT (Ctrl-C)."""

from __future__ import annotations

import asyncio
import signal

__all__ = ["STOP_SIGNALS", "until_stop_signal"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def until_stop_signal() -> None:
    """Return when SIGTERM or SIGINT arrives; the handlers are removed again after."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
