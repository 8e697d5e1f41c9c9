"""``tokenwire worker``: one engine served over the engine protocol, for gateways.

Lifecycle as the gateway's: start loads the engine and its tokenizer, binds, and
reports SERVING; SIGTERM (or :meth:`WorkerServer.stop`) reports NOT_SERVING and
``HealthCheck`` unhealthy, refuses new Generate calls with UNAVAILABLE (routers
send them elsewhere), lets running streams finish within the grace period, then
closes the engine.

    worker = WorkerServer(load_config(...), engine=engine)
    await worker.serve()       # until SIGTERM / SIGINT

A worker runs none of the public API's interceptors: it trusts its gateways and
accepts only them (a shared bearer token and/or mTLS, see ``[worker]``).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

from tokenwire.backend import Engine, create_backend
from tokenwire.config import Config
from tokenwire.errors import ConfigError
from tokenwire.logs import get_logger
from tokenwire.metrics.endpoint import MetricsEndpoint
from tokenwire.metrics.registry import Metrics
from tokenwire.model.tokenizers import load_tokenizer
from tokenwire.signals import until_stop_signal
from tokenwire.tls import server_credentials
from tokenwire.tracing.spans import Tracing
from tokenwire.worker.service import EngineServicer
from tokenwire.worker.tokenizer_files import pack_tokenizer

__all__ = ["ENGINE_SERVICE_NAME", "WorkerServer"]

ENGINE_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name
_log = get_logger("tokenwire.worker")


class WorkerServer:
    """A worker built from configuration, or around a ready-made ``engine``."""

    def __init__(
        self, config: Config, *, engine: Engine | None = None, tracing: Tracing | None = None
    ) -> None:
        self.config = config
        self.tracing = tracing if tracing is not None else Tracing.from_config(config.tracing)
        backend = engine if engine is not None else create_backend(config.backend)
        if not isinstance(backend, Engine):
            raise ConfigError(
                f"backend {config.backend.name!r} is a text backend; a worker hosts token engines"
            )
        self.engine: Engine = backend
        self.metrics = (
            Metrics(tenant_labels=config.metrics.tenant_labels) if config.metrics.enabled else None
        )
        self.metrics_endpoint = (
            MetricsEndpoint(config.metrics, self.metrics, backend) if self.metrics else None
        )
        self._secret = config.worker.secret()
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None
        self._servicer: EngineServicer | None = None
        self._archive: asyncio.Future[bytes] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """``host:port`` actually bound (after :meth:`start`)."""
        return f"{self.config.worker.listen.rsplit(':', 1)[0]}:{self.port}"

    async def start(self) -> None:
        """Start the engine, load its tokenizer, bind and serve; a failed start
        closes what it opened."""
        try:
            await self._start()
        except BaseException:
            if self.metrics_endpoint is not None:
                await self.metrics_endpoint.close()
            await self.engine.close()
            raise

    async def _start(self) -> None:
        cfg = self.config.worker
        await self.engine.start()
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.start()
        source = self.engine.capabilities.tokenizer
        if source is None:
            raise ConfigError(f"engine {type(self.engine).__name__} names no tokenizer")
        tokenizer = await asyncio.to_thread(load_tokenizer, source)
        self._servicer = EngineServicer(
            self.engine,
            eos_token_ids=tokenizer.eos_token_ids,
            archive=self._tokenizer_archive,
            model_path=self.config.backend.model_path,
            message_interval_s=cfg.message_interval_ms / 1000,
            metrics=self.metrics,
            tracing=self.tracing,
        )
        interceptors = [_TokenInterceptor(self._secret)] if self._secret else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", 16 << 20)],
        )
        pb_grpc.add_VllmEngineServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        credentials = server_credentials(
            "worker", cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file
        )
        try:
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
        for name in ("", ENGINE_SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        _log.info("worker serving", address=self.address, model=self.engine.capabilities.model)
        if not self._secret and credentials is None:
            _log.warning(
                "the worker accepts any caller: set worker.token or worker.tls_client_ca_file",
                address=self.address,
            )

    async def _tokenizer_archive(self) -> bytes:
        """The tokenizer's zip, built once on first request."""
        if self._archive is None:
            source = self.engine.capabilities.tokenizer
            assert source is not None
            self._archive = asyncio.ensure_future(asyncio.to_thread(pack_tokenizer, source))
        return await asyncio.shield(self._archive)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and shut down; safe to call more than once (later calls wait)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.config.worker.grace_period_s if grace is None else grace
        _log.info("worker draining", grace_period_s=grace)
        if self._servicer is not None:
            self._servicer.draining = True
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            # Running streams go on; new Generate calls are refused as UNAVAILABLE.
            loop = asyncio.get_running_loop()
            until = loop.time() + grace
            if self._servicer is not None:
                await self._servicer.wait_idle(grace)
            await self._server.stop(max(0.0, until - loop.time()))
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)
        await self.engine.close()
        _log.info("worker stopped")

    async def wait(self) -> None:
        """Until the worker has stopped."""
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


class _TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Every call but health checks must carry ``authorization: Bearer <token>``."""

    def __init__(self, secret: str) -> None:
        self._expected = f"Bearer {secret}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return await continuation(details)
        handler = await continuation(details)
        return _refusal(handler)


def _refusal(handler: Any) -> Any:
    """A handler of the same shape that refuses the call as UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "this worker accepts only its gateways"
        )

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "this worker accepts only its gateways"
        )
        yield  # type: ignore[unreachable]  # makes this an async generator

    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming, handler.request_deserializer, handler.response_serializer
        )
    raise ConfigError("the worker serves no client-streaming methods")
