"""The server's lifecycle: build, start, serve, drain, close.

Start: load the backend and its frontend, open the conversation store, bind,
report SERVING. Stop (SIGTERM/SIGINT or :meth:`TokenwireServer.stop`): health
goes NOT_SERVING, new calls are refused, in-flight streams get
``server.grace_period_s`` to finish (Converse sessions end after their running
turn), then the backend and the store close.

    server = TokenwireServer(load_config())
    await server.serve()          # until SIGTERM / SIGINT
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenwire.auth.bootstrap import admin_key_notice
from tokenwire.backend import Backend, create_backend
from tokenwire.config import Config
from tokenwire.errors import ConfigError
from tokenwire.interceptors import Interceptor, InterceptorChain
from tokenwire.live import LiveBus, live_bus_from_config
from tokenwire.logs import get_logger
from tokenwire.metrics.endpoint import MetricsEndpoint
from tokenwire.model.frontend import ChatModel, frontend_for
from tokenwire.pipeline import build_pipeline
from tokenwire.proto.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    conversations_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from tokenwire.router.engine import RoutedEngine
from tokenwire.services.admin import ADMIN_SERVICE_NAME, add_admin_service
from tokenwire.services.chat import ChatServicer
from tokenwire.services.conversations import CONVERSATION_SERVICE_NAME, ConversationServicer
from tokenwire.services.models import ModelServicer
from tokenwire.signals import until_stop_signal
from tokenwire.stores import open_store_from_config
from tokenwire.stores.conversations import ConversationStore
from tokenwire.tls import server_credentials
from tokenwire.tracing.spans import Tracing
from tokenwire.turns.policy import TurnPolicy
from tokenwire.turns.runner import TurnRunner
from tokenwire.usage.report import UsageReport

if TYPE_CHECKING:  # tritonclient is an optional extra: imported only when served
    from tokenwire.edge.server import HttpEdge
    from tokenwire.services.inference import InferenceServicer

__all__ = ["SERVICE_NAMES", "TokenwireServer"]

SERVICE_NAMES = (
    chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
    CONVERSATION_SERVICE_NAME,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)
_log = get_logger("tokenwire.server")
_SAVE_TIMEOUT_S = 5.0  # cut turns get this long to store what they sent


class TokenwireServer:
    """A gRPC chat server built from configuration and optional ready-made parts.

    Pass ``backend``, ``store``, ``interceptors`` or ``policies`` to replace what
    the configuration would build (tests, embedding in another program). A chain
    must start with the errors interceptor and hold an authentication interceptor
    (:func:`tokenwire.pipeline.check_chain`), or the server refuses to be built;
    the turn policies stay those of the configuration unless ``policies`` is given.
    """

    def __init__(
        self,
        config: Config,
        *,
        backend: Backend | None = None,
        store: ConversationStore | None = None,
        live: LiveBus | None = None,
        interceptors: Sequence[Interceptor] | None = None,
        policies: Sequence[TurnPolicy] | None = None,
        serve_metrics: bool = True,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self._store = store if store is not None else open_store_from_config(config.store)
        # Spans of every turn with tracing.enabled (``tracing`` replaces the OTLP export).
        self.tracing = tracing if tracing is not None else Tracing.from_config(config.tracing)
        self.pipeline = build_pipeline(
            config, interceptors=interceptors, policies=policies, store=self._store
        )
        self._interceptors = list(self.pipeline.interceptors)
        self._policies = list(self.pipeline.policies)
        metrics = self.pipeline.metrics
        if backend is None:
            # Workers named: every turn goes to one of them; else the engine runs here.
            backend = (
                RoutedEngine(
                    config.router,
                    observer=metrics.router_events() if metrics else None,
                    tracing=self.tracing,
                )
                if config.router.worker_list
                else create_backend(config.backend)
            )
        self._backend = backend
        self.model: ChatModel = frontend_for(self._backend, config.limits)
        # A policy that asks the served model itself (moderation's guard model, target
        # "serving") gets it here, before any policy starts: handed over, never looked up.
        for policy in self._policies:
            bind_model = getattr(policy, "bind_model", None)
            if bind_model is not None:
                bind_model(self.model)
        self._live = live if live is not None else live_bus_from_config(config.store)
        # With several processes only the first serves the metrics (of them all).
        self.metrics_endpoint = (
            MetricsEndpoint(config.metrics, metrics, self._backend, serve=serve_metrics)
            if metrics is not None
            else None
        )
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None
        self._chat: ChatServicer | None = None
        self._inference: InferenceServicer | None = None  # server.open_inference
        self._edge_dir: str | None = None  # http.enabled: the private socket's folder
        self.http: HttpEdge | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def backend(self) -> Backend:
        """The backend that answers turns."""
        return self._backend

    @property
    def address(self) -> str:
        """``host:port`` actually bound (after :meth:`start`)."""
        host = self.config.server.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Load the model, open the store, bind and start serving.

        If any step fails, what was already opened is closed again before the error
        propagates.
        """
        try:
            await self._start()
        except BaseException:
            await self._release()
            raise

    async def _release(self) -> None:
        # Each part's close() is safe on a part that never opened.
        for close in (
            self.model.close,
            # A policy's close() is optional, as its start() is.
            *(c for p in reversed(self._policies) if (c := getattr(p, "close", None))),
            *(i.close for i in reversed(self._interceptors)),
            *([self.metrics_endpoint.close] if self.metrics_endpoint else []),
            *([self._close_tracing] if self.tracing else []),
            self._close_edge,
            self._live.close,
            self._store.close,
        ):
            try:
                await close()
            except Exception:
                _log.exception("closing after a failed start failed")

    async def _start(self) -> None:
        await self.model.start()
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.start()
        await self._store.open()
        await self._live.open()
        for interceptor in self._interceptors:
            await interceptor.start()
        for policy in self._policies:
            start = getattr(policy, "start", None)
            if start is not None:
                await start()
        models = {self.model.name: self.model}
        cfg = self.config.server
        server = grpc.aio.server(
            interceptors=[InterceptorChain(self._interceptors)],
            options=[
                ("grpc.so_reuseport", int(cfg.reuse_port)),
                ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_streams,
        )
        names = [*SERVICE_NAMES, health.SERVICE_NAME]
        auth = self.pipeline.auth
        if auth is not None and auth.serves_keys:
            report = UsageReport(self._store, self.config.usage)
            add_admin_service(
                server,
                auth.key_store,
                usage=report if self.config.usage.enabled else None,
                abuse=self.pipeline.abuse,
            )
            names.append(ADMIN_SERVICE_NAME)
        if auth is not None and auth.admin_key is not None:
            # The first start's admin key: shown once, kept only as a hash (and in its 0600 file).
            print(admin_key_notice(auth.admin_key, auth.admin_key_file), file=sys.stderr)
        runner = TurnRunner(
            models,
            self._store,
            self.config.limits,
            self._policies,
            coalesce_chunks=cfg.coalesce_chunks,
            coalesce_budget_us=cfg.coalesce_budget_us,
            live=self._live,
            tracing=self.tracing,
        )
        self._chat = ChatServicer(runner, outbox_limit=cfg.converse_outbox_messages)
        chat_pb2_grpc.add_ChatServiceServicer_to_server(self._chat, server)
        conversations_pb2_grpc.add_ConversationServiceServicer_to_server(
            ConversationServicer(self._store, self._live), server
        )
        models_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(models, self.config.backend.name), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if cfg.open_inference:
            names.append(self._add_inference(server, runner, models))
        if cfg.reflection:
            names.append(reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        if self.config.http.enabled:
            # The web edge's own way in: a Unix socket only this user can reach, so its
            # calls pass the same interceptors and policies as every other call.
            self._edge_dir = tempfile.mkdtemp(prefix="tokenwire-edge-")
            server.add_insecure_port(f"unix:{self._edge_dir}/grpc.sock")
        try:
            credentials = server_credentials(
                "server", cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file
            )
            if credentials is None:
                self.port = server.add_insecure_port(cfg.listen)
            else:
                self.port = server.add_secure_port(cfg.listen, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {cfg.listen!r}: {exc}") from exc
        if self.port == 0:
            raise ConfigError(f"cannot listen on {cfg.listen!r}")
        await server.start()
        self._server = server
        if self._edge_dir is not None:
            from tokenwire.edge.openai import openai_routes
            from tokenwire.edge.page import chat_page_routes
            from tokenwire.edge.server import HttpEdge
            from tokenwire.edge.web import web_routes

            limit = self.config.http.max_body_bytes
            self.http = HttpEdge(
                self.config.http,
                f"unix:{self._edge_dir}/grpc.sock",
                [
                    functools.partial(openai_routes, max_body_bytes=limit),
                    functools.partial(web_routes, max_body_bytes=limit),
                    *([chat_page_routes] if self.config.http.chat_page else []),
                ],
            )
            await self.http.start()
        for name in ("", *names):
            if name not in (health.SERVICE_NAME, reflection.SERVICE_NAME, ADMIN_SERVICE_NAME):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        _log.info("serving", address=self.address, model=self.model.name)
        if auth is not None and not auth.config.enabled:
            _log.warning(
                "authentication is OFF: every caller is served as default/anonymous and "
                "all of them share one set of conversations; set auth.enabled = true",
                address=self.address,
            )

    async def _close_edge(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self._edge_dir is not None:
            shutil.rmtree(self._edge_dir, ignore_errors=True)
            self._edge_dir = None

    async def _close_tracing(self) -> None:
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)  # exports what is buffered

    def _add_inference(
        self, server: grpc.aio.Server, runner: TurnRunner, models: dict[str, ChatModel]
    ) -> str:
        """Serve the Open Inference Protocol beside ChatService (tritonclient's stubs)."""
        try:
            from tokenwire.services.inference import InferenceServicer, add_inference_service
        except ImportError as exc:
            raise ConfigError(
                f"server.open_inference needs tritonclient ({exc}); "
                "install its extra: pip install 'tokenwire[triton]'"
            ) from exc
        self._inference = InferenceServicer(
            runner, models, stream_requests=self.config.server.inference_stream_requests
        )
        return add_inference_service(server, self._inference)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and shut down; safe to call more than once (later calls wait)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.config.server.grace_period_s if grace is None else grace
        _log.info("draining", grace_period_s=grace)
        await self._health.enter_graceful_shutdown()
        if self._chat is not None:
            self._chat.drain()
        if self._inference is not None:
            self._inference.drain()
        # Watchers follow forever: end their streams now, not at the end of the grace period.
        await self._live.close()
        if self._server is not None:
            # NOT_SERVING first, so load balancers stop sending before the port closes.
            await asyncio.sleep(self.config.server.drain_delay_s)
            if self.http is not None:
                await self.http.close()  # its streams end with the gRPC calls behind them
            await self._server.stop(grace)
        if self._chat is not None:
            await self._chat.detached.finish(grace)  # keyed turns whose client left
        if self._chat is not None and not await self._chat.turns.wait_idle(_SAVE_TIMEOUT_S):
            _log.warning("turns still saving at shutdown", timeout_s=_SAVE_TIMEOUT_S)
        await self._release()
        _log.info("stopped")

    async def wait(self) -> None:
        """Until the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping

    async def serve(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then drain and stop."""
        await self.start()
        try:
            await until_stop_signal()
        finally:
            await self.stop()
