"""The HTTP edge's lifecycle: an ASGI app (Starlette) served by uvicorn on this event loop.

:class:`HttpEdge` opens a gRPC channel to the gateway's private Unix socket (the
server adds it when ``http.enabled``), builds the app from the route modules
(:mod:`tokenwire.edge.openai`, :mod:`tokenwire.edge.web`) and serves it on
``http.listen``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from tokenwire.edge.config import HttpConfig
from tokenwire.errors import ConfigError
from tokenwire.logs import get_logger

__all__ = ["HttpEdge", "RouteFactory"]

_log = get_logger("tokenwire.http")
# A route module's factory: the gRPC channel to the gateway -> Starlette routes.
RouteFactory = Callable[[grpc.aio.Channel], Sequence[Any]]


class HttpEdge:
    """Serves ``routes`` (built on a channel to ``grpc_target``) on ``config.listen``."""

    def __init__(
        self, config: HttpConfig, grpc_target: str, routes: Sequence[RouteFactory]
    ) -> None:
        self.config = config
        self._target = grpc_target
        self._routes = tuple(routes)
        self._channel: grpc.aio.Channel | None = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind and serve; a ConfigError when the address cannot be bound."""
        import uvicorn
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        self._channel = grpc.aio.insecure_channel(self._target)
        routes = [route for factory in self._routes for route in factory(self._channel)]
        origins = [o.strip() for o in self.config.cors_origins.split(",") if o.strip()]
        middleware = (
            [
                Middleware(
                    CORSMiddleware,
                    allow_origins=origins,
                    allow_methods=["GET", "POST", "OPTIONS"],
                    allow_headers=["*"],
                    expose_headers=["*"],
                )
            ]
            if origins
            else []
        )
        app = Starlette(routes=routes, middleware=middleware)
        host, _, port = self.config.listen.rpartition(":")
        config = uvicorn.Config(
            app, host=host or "0.0.0.0", port=int(port), log_level="warning", lifespan="off",
            access_log=False,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the gateway handles signals
        self._task = asyncio.ensure_future(self._server.serve())
        while not self._server.started:
            if self._task.done():
                error = self._task.exception() if not self._task.cancelled() else None
                raise ConfigError(f"http.listen {self.config.listen!r}: cannot serve ({error})")
            await asyncio.sleep(0.01)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        _log.info("http serving", address=f"{host}:{self.port}")

    async def close(self) -> None:
        """Stop accepting, let running responses end, close the channel."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            if not self._task.done():
                self._task.cancel()
            self._server = self._task = None
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
