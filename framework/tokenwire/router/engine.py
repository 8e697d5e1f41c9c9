"""The router as an engine: each request goes to one of many remote workers.

The gateway's frontend, conversations, auth, quotas and moderation see one
:class:`~tokenwire.backend.Engine`; behind it, :class:`RoutedEngine` picks a worker
per turn (:mod:`tokenwire.router.fleet`), polls every worker's load and health,
and handles failures:

* a worker that fails before the first token (unreachable, draining, at capacity)
  is left for another, up to ``router.retries`` times, without the client noticing;
  one at capacity (RESOURCE_EXHAUSTED, or SGLang's full queue) is busy, not
  failing, and does not count towards its ejection;
* a failure after the first token ends the answer with UNAVAILABLE (the turn runner
  stores the partial answer as incomplete);
* failures in a row eject a worker for ``router.eject_s``; health checks bring it
  back, as they bring back a restarted one;
* with every worker saturated, :meth:`check_admission` refuses the turn with
  RESOURCE_EXHAUSTED and a retry delay before it starts.

Each worker is polled by a task of its own, one health call per round at most,
so a slow answer (SGLang's HealthCheck RPC takes a second or more on servers
without ``grpc.health.v1``) holds up that worker's next poll and no other's.

Workers come from a static list or ``dns:///name:port`` entries re-resolved
every ``router.dns_refresh_s`` (a Kubernetes headless Service). Each entry's
scheme names the engine protocol its workers speak (:mod:`tokenwire.router.targets`):
VllmEngine (no scheme), TensorRT-LLM's TrtllmService (``trtllm://``) or SGLang's
SglangScheduler (``sglang://``); the router treats them all alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from tokenwire.backend import Capabilities, Chunk, GenerateRequest, LoadReport
from tokenwire.errors import (
    ConfigError,
    ResourceExhaustedError,
    TokenwireError,
    UnavailableError,
)
from tokenwire.logs import get_logger
from tokenwire.router.client import EngineClient
from tokenwire.router.config import RouterConfig
from tokenwire.router.fleet import Fleet, Policy, TurnView, WorkerState
from tokenwire.router.remote import client_for
from tokenwire.router.targets import parse_entry, worker_key
from tokenwire.tls import channel_credentials

if TYPE_CHECKING:
    from tokenwire.tracing.spans import Tracing

__all__ = ["RoutedEngine", "RouterObserver", "resolve_workers"]

_log = get_logger("tokenwire.router")
_RETRY_AFTER_S = 0.5
_HEALTH_EVERY = 4  # polls between health checks where a load call answers the rest
_MAX_BATCH = 1 << 20  # admission is the router's own (check_admission), not a fixed count


class RouterObserver(Protocol):
    """What the router tells as it works (metrics count it); every method is cheap."""

    def decided(self, worker: str) -> None:
        """A turn was sent to ``worker``."""

    def retried(self, worker: str) -> None:
        """``worker`` failed before the first token; the turn tries another."""

    def ejected(self, worker: str) -> None:
        """``worker`` was taken out of rotation."""


class RoutedEngine:
    """An engine whose requests run on the workers of ``config``; ``policy`` replaces
    ``config.policy`` with a routing policy of one's own, ``observer`` hears of every
    decision, retry and ejection, ``tracing`` records a span per turn (the router's,
    between the gateway's and the worker's)."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        policy: Policy | None = None,
        observer: RouterObserver | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        if not config.worker_list:
            raise ConfigError("router.workers names no worker")
        self.config = config
        self._secret = config.secret()
        self._credentials = channel_credentials(
            "router", config.tls_ca_file, config.tls_cert_file, config.tls_key_file
        )
        self.fleet = Fleet(
            policy if policy is not None else config.policy,
            affinity_conversations=config.affinity_conversations,
            max_queue_per_slot=config.max_queue_per_slot,
            eject_after_failures=config.eject_after_failures,
            eject_s=config.eject_s,
        )
        self.observer = observer
        self._tracing = tracing
        self._capabilities = Capabilities(model="", context_length=0)
        self._tasks: list[asyncio.Task[None]] = []
        self._pollers: dict[str, asyncio.Task[None]] = {}  # worker key -> its poll loop
        self._polling = False  # started: workers added from now on get a poller at once
        self._closed = False

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def start(self) -> None:
        """Find the workers and wait (``connect_timeout_s``) for one to answer; its
        model and tokenizer become the router's."""
        await self._refresh()
        deadline = time.monotonic() + self.config.connect_timeout_s
        last: Exception | None = None
        while True:
            misconfigured = 0  # workers that answered but cannot serve as configured
            for worker in list(self.fleet.workers.values()):
                probe = self._connect(worker.key, probe=True)
                try:
                    await probe.start()
                except TokenwireError as exc:
                    last = exc
                    misconfigured += isinstance(exc, ConfigError)
                    continue
                finally:
                    await probe.close()
                self._capabilities = Capabilities(
                    model=probe.capabilities.model,
                    context_length=probe.capabilities.context_length,
                    max_batch=_MAX_BATCH,
                    tokenizer=probe.capabilities.tokenizer,
                )
                break
            if self._capabilities.context_length or time.monotonic() > deadline:
                break
            if misconfigured and misconfigured == len(self.fleet.workers):
                raise ConfigError(str(last))  # waiting would not change the answer
            await asyncio.sleep(0.2)
            await self._refresh()
        if not self._capabilities.context_length:
            raise ConfigError(
                f"no worker of router.workers={self.config.workers!r} answered within "
                f"{self.config.connect_timeout_s} s: {last}"
            )
        self._polling = True
        for worker in self.fleet.workers.values():
            self._start_polling(worker)
        if any(parse_entry(entry).dns for entry in self.config.worker_list):
            self._tasks.append(asyncio.create_task(self._resolve_forever()))
        _log.info("routing", workers=len(self.fleet.workers), policy=self.config.policy)

    async def close(self) -> None:
        self._closed = True
        self._polling = False
        tasks = [*self._tasks, *self._pollers.values()]
        self._pollers.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for worker in list(self.fleet.workers.values()):
            await _engine(worker).close()

    def load(self) -> LoadReport:
        """This router's requests in flight (exact, not as of the last report), the
        prompt tokens it sent that have no first token yet, and the fleet's reported
        KV use (the fullest worker's) and throughput."""
        workers = self.fleet.workers.values()
        usable = self.fleet.usable()
        return LoadReport(
            running=sum(w.in_flight for w in workers),
            queued=0,
            queued_tokens=sum(w.pending_tokens for w in workers),
            kv_cache_usage=max((w.load.kv_cache_usage for w in usable), default=0.0),
            tokens_per_second=sum(w.load.tokens_per_second for w in usable),
        )

    def check_admission(self) -> None:
        """Before a turn starts: refuse it when no worker could take it now."""
        if self.fleet.saturated():
            raise _at_capacity()
        if not self.fleet.usable():
            raise UnavailableError("no model worker is available; retry shortly")

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        # Untraced, the routing generator itself: no layer re-yielding every chunk.
        if self._tracing is None or not request.trace_metadata:
            return self._generate(request, None)
        return self._traced(request, self._tracing)

    async def _traced(self, request: GenerateRequest, tracing: Tracing) -> AsyncIterator[Chunk]:
        span = tracing.start(
            "tokenwire.route",
            request.trace_metadata,
            {"router.policy": str(self.config.policy)},
        )
        try:
            # The worker's span is the router's child.
            routed = dataclasses.replace(request, trace_metadata=tracing.inject(span))
            async for chunk in self._generate(routed, span):
                yield chunk
        finally:
            span.end()

    async def _generate(self, request: GenerateRequest, span: Any) -> AsyncIterator[Chunk]:
        turn = TurnView(
            len(request.prompt_token_ids), request.cache_scope, request.shared_prefix_tokens
        )
        fleet = self.fleet
        tried: list[str] = []
        last: TokenwireError | None = None
        for _ in range(self.config.retries + 1):
            worker = fleet.choose(turn, exclude=tried)
            if worker is None:
                break
            tried.append(worker.key)
            fleet.sent(worker, turn)
            if self.observer is not None:
                self.observer.decided(worker.key)
            if span is not None:
                span.set_attribute("router.worker", worker.key)
                span.set_attribute("router.attempts", len(tried))
            started = time.monotonic()
            stream = _engine(worker).generate(request)
            got_first = False
            tokens = 0
            settled = False
            try:
                try:
                    chunk = await stream.__anext__()
                except (UnavailableError, ResourceExhaustedError) as exc:
                    last = exc  # nothing reached the client: another worker may answer
                    if isinstance(exc, UnavailableError):
                        self._failed(worker)  # a busy worker is not a failing one
                    if self.observer is not None:
                        self.observer.retried(worker.key)
                    continue
                got_first = True
                fleet.first_token(worker, turn, time.monotonic() - started)
                while True:
                    tokens += len(chunk.token_ids)
                    if chunk.finish_reason is not None:
                        # Before the last chunk goes out: load() no longer counts it then.
                        settled = True
                        self._finished(worker, turn, got_first, started, tokens)
                        yield chunk
                        return
                    yield chunk
                    chunk = await stream.__anext__()
            except UnavailableError:
                self._failed(worker)
                raise
            finally:
                if not settled:
                    self._finished(worker, turn, got_first, started, tokens)
                await stream.aclose()  # type: ignore[attr-defined]
        if last is not None and not isinstance(last, ResourceExhaustedError):
            raise UnavailableError("no model worker could take the turn; retry shortly")
        raise _at_capacity()

    def _failed(self, worker: WorkerState) -> None:
        if self.fleet.failed(worker) and self.observer is not None:
            self.observer.ejected(worker.key)

    def _finished(
        self, worker: WorkerState, turn: TurnView, got_first: bool, started: float, tokens: int
    ) -> None:
        self.fleet.finished(
            worker,
            turn,
            got_first=got_first,
            duration_s=time.monotonic() - started,
            cached_tokens=turn.prompt_tokens + tokens,
        )

    def _connect(self, key: str, *, probe: bool = False) -> EngineClient:
        """An engine client for the worker ``key``, in its protocol; a probe also
        fetches model and tokenizer."""
        config = self.config
        return client_for(
            key,
            token=self._secret,
            credentials=self._credentials,
            tokenizer_cache_dir=config.tokenizer_cache_dir,
            timeout_s=config.connect_timeout_s,
            fetch_tokenizer=probe,
            message_interval_ms=config.message_interval_ms,
            tokenizer_path=config.tokenizer,
            context_length=config.context_length,
            default_max_running=config.default_max_running,
        )

    # -- background: load, health, discovery ---------------------------------

    def _start_polling(self, worker: WorkerState) -> None:
        if worker.key not in self._pollers:
            task = asyncio.create_task(self._poll_forever(worker))
            self._pollers[worker.key] = task

    async def _stop_polling(self, key: str) -> None:
        task = self._pollers.pop(key, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll_forever(self, worker: WorkerState) -> None:
        """Poll one worker every ``poll_interval_s`` after its last poll ended."""
        interval = self.config.poll_interval_s
        rounds = 0
        while not self._closed:
            await self._poll(worker, rounds % _HEALTH_EVERY == 0)
            rounds += 1
            await asyncio.sleep(interval)

    async def _poll(self, worker: WorkerState, check_health: bool) -> None:
        engine = _engine(worker)
        now = time.monotonic()
        if not worker.healthy and now < worker.ejected_until:
            return  # sitting out its ejection
        try:
            if not engine.model_checked:
                await self._check_model(worker, engine)
            report = await engine.poll(check_health=check_health or not worker.healthy)
        except Exception as exc:  # unreachable or refusing: count it
            self._failed(worker)
            if worker.failures == self.config.eject_after_failures:
                _log.warning("worker ejected", worker=worker.key, error=str(exc))
            return
        worker.draining = engine.draining  # as of its last health check
        was_down = not worker.healthy
        self.fleet.report(worker, report, engine.max_running)
        if was_down:
            _log.info("worker back in rotation", worker=worker.key)

    async def _check_model(self, worker: WorkerState, engine: EngineClient) -> None:
        """Keep a worker that serves another model than the router's out of rotation:
        its tokens would mean other words under this gateway's tokenizer."""
        served = await engine.model()
        engine.model_checked = True
        wanted = self._capabilities.model
        if served != wanted:
            worker.excluded = f"serves {served!r}, not {wanted!r}"
            _log.error("worker left out", worker=worker.key, reason=worker.excluded)

    async def _resolve_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.dns_refresh_s)
            try:
                await self._refresh()
            except Exception:
                _log.exception("resolving workers failed; keeping the last list")

    async def _refresh(self) -> None:
        """Bring the fleet in line with the configured list (DNS resolved now)."""
        wanted = await resolve_workers(self.config.worker_list)
        for key in wanted:
            if key not in self.fleet.workers:
                worker = self.fleet.add(key, self._connect(key))
                if self._polling:
                    self._start_polling(worker)
        for key in [k for k in self.fleet.workers if k not in wanted]:
            await self._stop_polling(key)
            gone = self.fleet.remove(key)
            if gone is not None:
                await _engine(gone).close()


def _at_capacity() -> ResourceExhaustedError:
    return ResourceExhaustedError(
        "every model worker is at capacity; retry shortly", retry_after_s=_RETRY_AFTER_S
    )


def _engine(worker: WorkerState) -> EngineClient:
    engine = worker.handle
    assert isinstance(engine, EngineClient)
    return engine


async def resolve_workers(entries: tuple[str, ...]) -> list[str]:
    """The fleet's keys for ``router.workers`` entries (see :func:`worker_key`):
    ``host:port`` entries as given, ``dns:///name:port`` (any protocol's, e.g.
    ``trtllm+dns:///name:port``) resolved to every address."""
    found: list[str] = []
    loop = asyncio.get_running_loop()
    for entry in entries:
        parsed = parse_entry(entry)
        if not parsed.dns:
            found.append(worker_key(parsed.protocol, parsed.address))
            continue
        host, sep, port = parsed.address.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"router.workers entry {entry!r} needs a port: dns:///NAME:PORT")
        try:
            infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            _log.warning("cannot resolve workers", entry=entry, error=str(exc))
            continue
        for family, _, _, _, address in infos:
            ip = address[0]
            target = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            key = worker_key(parsed.protocol, target)
            if key not in found:
                found.append(key)
    return found
