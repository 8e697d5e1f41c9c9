"""What every engine client shares, whatever engine protocol its worker speaks.

An :class:`EngineClient` is an :class:`~tokenwire.backend.Engine` on a remote
worker: token ids go out, token ids come back (the gateway's model frontend
templates and detokenizes). The protocols differ in their messages only; this
class holds everything else once:

* the channel, the bearer token and TLS;
* the answer's stream read into :class:`~tokenwire.backend.Chunk`\\ s: new token
  ids as they come, then one final chunk with the finish reason and counts. A
  stop token that a server sends (SGLang does) ends the answer and is not passed
  on, as the engine contract says;
* leaving: closing the answer's iterator cancels the call and sends Abort by
  request id, so the worker stops within a step;
* errors with their meaning kept: RESOURCE_EXHAUSTED stays RESOURCE_EXHAUSTED,
  and so does a protocol's own way of saying it is at capacity (SGLang's full
  queue, sent as UNAVAILABLE), so the router tries another worker without
  counting a failure; a refused request is INVALID_ARGUMENT, and anything else
  (unreachable, INTERNAL, a worker dying mid-answer) is UNAVAILABLE, so the router
  tries another worker when nothing reached the client yet;
* the tokenizer, fetched with GetTokenizer (a zip in chunks, the same message in
  every protocol) or read from ``router.tokenizer``;
* load: the protocol's own load call when it has one; a server without one
  (UNIMPLEMENTED, or a protocol that has none) is asked for its health instead,
  and its load is what the router itself sent it.

A protocol's client subclasses it with its stub, its Generate request message, how
one response reads, and its model-info, health, load and abort calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import grpc
from smg_grpc_proto.generated import common_pb2

from tokenwire.backend import (
    Capabilities,
    Chunk,
    FinishReason,
    GenerateRequest,
    LoadReport,
    TokenizerSource,
)
from tokenwire.errors import (
    ConfigError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TokenwireError,
    UnavailableError,
)
from tokenwire.worker.protocol import CACHE_SCOPE_KEY, MESSAGE_INTERVAL_KEY, SHARED_PREFIX_KEY
from tokenwire.worker.tokenizer_files import unpack_tokenizer

__all__ = [
    "Ending",
    "EngineClient",
    "ModelInfo",
    "SchedulerLoadLike",
    "error_of",
    "load_of_ranks",
]

_RETRY_AFTER_S = 1.0
_NO_TOKENIZER = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a worker says about its model (0: it did not say)."""

    model: str
    context_length: int
    max_running: int = 0


@dataclass(frozen=True, slots=True)
class Ending:
    """An answer's final message: ``output_ids`` holds every output token when the
    protocol's final message carries them all (empty when it does not)."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    output_ids: Sequence[int] = ()


class SchedulerLoadLike(Protocol):
    """One data-parallel rank's load, as VllmEngine's and SGLang's GetLoads send it."""

    @property
    def num_running_reqs(self) -> int: ...
    @property
    def num_waiting_reqs(self) -> int: ...
    @property
    def num_waiting_uncached_tokens(self) -> int: ...
    @property
    def token_usage(self) -> float: ...
    @property
    def gen_throughput(self) -> float: ...
    @property
    def max_running_requests(self) -> int: ...


def load_of_ranks(loads: Sequence[SchedulerLoadLike]) -> tuple[LoadReport, int]:
    """A worker's load over its data-parallel ranks (requests and throughput add up,
    KV use is the fullest rank's), and the requests it runs at once (0: unknown)."""
    report = LoadReport(
        running=sum(x.num_running_reqs for x in loads),
        queued=sum(x.num_waiting_reqs for x in loads),
        queued_tokens=sum(x.num_waiting_uncached_tokens for x in loads),
        kv_cache_usage=min(1.0, max((x.token_usage for x in loads), default=0.0)),
        tokens_per_second=sum(x.gen_throughput for x in loads),
    )
    return report, sum(x.max_running_requests for x in loads)


class EngineClient:
    """One remote worker as an engine; ``load()`` is what :meth:`poll` last read.

    ``tokenizer_path`` (``router.tokenizer``) replaces the tokenizer the worker
    would send; ``context_length`` and ``default_max_running`` stand in for what
    a worker does not report.
    """

    protocol: ClassVar[str] = ""
    has_load_call: ClassVar[bool] = True  # False: the protocol has no load call at all

    def __init__(
        self,
        target: str,
        *,
        token: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        tokenizer_cache_dir: str = "~/.cache/tokenwire/tokenizers",
        timeout_s: float = 5.0,
        fetch_tokenizer: bool = True,
        message_interval_ms: float = 0.0,
        tokenizer_path: str = "",
        context_length: int = 0,
        default_max_running: int = 0,
    ) -> None:
        self.target = target
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        # Generate asks for fewer, larger messages when the engine is faster than that
        # (Tokenwire metadata: other servers ignore keys they do not know).
        self._generate_metadata = self._metadata + (
            ((MESSAGE_INTERVAL_KEY, f"{message_interval_ms:g}"),) if message_interval_ms else ()
        )
        self._credentials = credentials
        self._cache_dir = tokenizer_cache_dir
        self._timeout = timeout_s
        self._fetch_tokenizer = fetch_tokenizer
        self._tokenizer_path = str(Path(tokenizer_path).expanduser()) if tokenizer_path else ""
        self._context_length = context_length
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._aborts: set[asyncio.Task[None]] = set()
        self._capabilities = Capabilities(model="", context_length=0)
        self._load = LoadReport()
        self.max_running = default_max_running
        self.draining = False
        self.reports_loads = self.has_load_call  # False: load is the router's own count
        self.model_checked = False  # the router compared the worker's model with its own

    # -- what a protocol's client supplies -------------------------------------

    def _new_stub(self, channel: grpc.aio.Channel) -> Any:
        raise NotImplementedError

    async def _model_info(self) -> ModelInfo:
        raise NotImplementedError

    async def _health(self) -> bool:
        raise NotImplementedError

    async def _loads(self) -> tuple[LoadReport, int]:
        raise NotImplementedError

    def _message(self, request: GenerateRequest) -> Any:
        """The protocol's GenerateRequest for ``request`` (streamed, token ids in)."""
        raise NotImplementedError

    def _read(self, response: Any) -> tuple[Sequence[int], Ending | None]:
        """One response of the Generate stream: new token ids, or the ending."""
        raise NotImplementedError

    async def _send_abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _at_capacity(self, exc: grpc.aio.AioRpcError) -> bool:
        """True when ``exc``, before the first token, refuses the request for capacity
        with a status other than RESOURCE_EXHAUSTED (a protocol that has its own way)."""
        return False

    # -- the engine ------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def load(self) -> LoadReport:
        return self._load

    @property
    def stub(self) -> Any:
        """The protocol's stub on this client's channel (opened on first use)."""
        if self._stub is None:
            options = [("grpc.max_receive_message_length", 16 << 20)]
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=options
                )
            self._stub = self._new_stub(self._channel)
        return self._stub

    async def start(self) -> None:
        """Read the worker's model and (unless told not to) its tokenizer;
        UnavailableError when it cannot be reached."""
        try:
            info = await self._info()
            tokenizer: TokenizerSource | None = None
            if self._tokenizer_path:
                tokenizer = TokenizerSource(path=self._tokenizer_path)
            elif self._fetch_tokenizer:
                tokenizer = await self._tokenizer()
            await self.poll()
        except grpc.aio.AioRpcError as exc:
            raise error_of(exc, self.target) from None
        context_length = info.context_length or self._context_length
        if context_length <= 0:
            raise ConfigError(
                f"worker {self.target} reports no context length; set router.context_length"
            )
        self._capabilities = Capabilities(
            model=info.model,
            context_length=context_length,
            max_batch=self.max_running or 1,
            tokenizer=tokenizer,
        )

    async def _info(self) -> ModelInfo:
        info = await self._model_info()
        self.max_running = info.max_running or self.max_running
        return info

    async def _tokenizer(self) -> TokenizerSource:
        call = self.stub.GetTokenizer(
            common_pb2.GetTokenizerRequest(), metadata=self._metadata, timeout=self._timeout * 12
        )
        try:
            pieces = [(chunk.data, chunk.sha256) async for chunk in call]
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _NO_TOKENIZER:
                raise
            raise ConfigError(
                f"worker {self.target} does not send its tokenizer (GetTokenizer: "
                f"{exc.code().name}); set router.tokenizer to a local directory holding "
                "the model's tokenizer files"
            ) from None
        return await asyncio.to_thread(unpack_tokenizer, pieces, self._cache_dir)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
        self._channel = self._stub = None

    async def model(self) -> str:
        """The model the worker serves (its model info); gRPC errors propagate."""
        return (await self._info()).model

    async def poll(self, *, check_health: bool = False) -> LoadReport:
        """Read the worker's load now, and its health (``draining``) too when
        ``check_health``; gRPC errors propagate. A server without a load call
        (UNIMPLEMENTED, or none in its protocol) is asked for its health instead, and
        its load is what the router itself sent it (``reports_loads`` turns False).
        Either way one poll makes one health call at most."""
        if self.reports_loads:
            try:
                self._load, max_running = await self._loads()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self.reports_loads = False
            else:
                self.max_running = max_running or self.max_running
                if check_health:
                    await self.healthy()
                return self._load
        await self.healthy()
        return self._load

    async def healthy(self) -> bool:
        """False when the worker says it is unhealthy or draining."""
        healthy = await self._health()
        self.draining = not healthy
        return healthy

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        metadata = self._generate_metadata + request.trace_metadata
        if request.cache_scope or request.shared_prefix_tokens:
            metadata = (
                *metadata,
                (CACHE_SCOPE_KEY, request.cache_scope),
                (SHARED_PREFIX_KEY, str(request.shared_prefix_tokens)),
            )
        # Every protocol names its streaming call Generate.
        call = self.stub.Generate(self._message(request), metadata=metadata)
        stops = request.stop_token_ids
        seen = 0  # output tokens the server sent, a stop token included
        sent = 0  # of them, passed on
        stopped = False  # the server sent the stop token that ended the answer
        done = False
        try:
            async for response in call:
                ids, end = self._read(response)
                if end is None:
                    seen += len(ids)
                    if ids and ids[-1] in stops:  # only ever the answer's last token
                        ids, stopped = ids[:-1], True
                    if ids:
                        sent += len(ids)
                        yield Chunk(tuple(ids))
                    continue
                # A cumulative ending: whatever the chunks did not carry is new.
                extra = tuple(end.output_ids[seen:])
                if extra and extra[-1] in stops:
                    extra, stopped = extra[:-1], True
                sent += len(extra)
                done = True
                yield Chunk(
                    extra,
                    end.finish_reason,
                    end.prompt_tokens or len(request.prompt_token_ids),
                    sent if stopped else end.completion_tokens or sent,
                )
                return
        except grpc.aio.AioRpcError as exc:
            done = True
            if sent == 0 and self._at_capacity(exc):
                raise _at_capacity() from None
            raise error_of(exc, self.target, mid_answer=sent > 0) from None
        finally:
            if not done:  # the consumer left: stop the worker's work within a step
                cancel = getattr(call, "cancel", None)
                if cancel is not None:
                    cancel()
                task = asyncio.get_running_loop().create_task(self._abort(request.request_id))
                self._aborts.add(task)
                task.add_done_callback(self._aborts.discard)
        raise UnavailableError(f"worker {self.target} ended an answer without finishing it")

    async def _abort(self, request_id: str) -> None:
        # Gone already (the cancelled call stopped it) or closed: nothing to do.
        if self._stub is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, AttributeError):
            await self._send_abort(request_id)


def error_of(exc: grpc.aio.AioRpcError, target: str, *, mid_answer: bool = False) -> TokenwireError:
    """A worker's status as the gateway's error (safe to show: no worker internals)."""
    code = exc.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _at_capacity()
    if code == grpc.StatusCode.INVALID_ARGUMENT and not mid_answer:
        return InvalidArgumentError(f"the worker refused the request: {exc.details()}")
    where = "in the middle of an answer" if mid_answer else "before answering"
    return UnavailableError(f"a model worker failed {where} ({code.name}); retry")


def _at_capacity() -> ResourceExhaustedError:
    return ResourceExhaustedError(
        "the model's workers are at capacity; retry shortly", retry_after_s=_RETRY_AFTER_S
    )
