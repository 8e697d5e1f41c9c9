"""Test doubles and helpers that ship with the framework.

* :class:`FakeBackend` — a zero-cost byte-level engine with failure injection;
* :func:`running_server` — a real server on port 0 with a client channel;
* :mod:`tokenwire.testing.conformance` — the suite every engine passes (needs pytest).
"""

from __future__ import annotations

from tokenwire.testing.fake import FakeBackend, FakeRequestLog, create_fake_backend
from tokenwire.testing.server import (
    BorrowedEngine,
    RunningServer,
    config_for_tests,
    running_server,
    running_worker,
)

__all__ = [
    "BorrowedEngine",
    "FakeBackend",
    "FakeRequestLog",
    "RunningServer",
    "config_for_tests",
    "create_fake_backend",
    "running_server",
    "running_worker",
]
