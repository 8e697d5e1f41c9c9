"""Routes of the web edge (filled in by the module's implementation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

__all__ = ["web_routes"]


def web_routes(channel: grpc.aio.Channel) -> Sequence[Any]:
    """The Starlette routes, served over ``channel`` to the gateway."""
    return []
