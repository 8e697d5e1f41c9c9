"""An :class:`~tokenwire.backend.Engine` on a remote worker, over ``VllmEngine``.

It works against ``tokenwire worker`` and against vLLM's own gRPC server alike:
token ids go out, token ids come back (the gateway's model frontend templates and
detokenizes). Closing the answer's iterator cancels the call and sends Abort, so
the worker stops within a step. Status codes keep their meaning: a worker's
RESOURCE_EXHAUSTED stays RESOURCE_EXHAUSTED, and a worker that cannot be reached
or dies mid-answer is UNAVAILABLE.

    engine = RemoteEngine("10.0.0.5:50061", token="s3cret")
    await engine.start()          # model info, and the tokenizer the worker sends
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from tokenwire.backend import Capabilities, Chunk, GenerateRequest, LoadReport, TokenizerSource
from tokenwire.errors import (
    InvalidArgumentError,
    ResourceExhaustedError,
    TokenwireError,
    UnavailableError,
)
from tokenwire.worker.protocol import (
    CACHE_SCOPE_KEY,
    MESSAGE_INTERVAL_KEY,
    SHARED_PREFIX_KEY,
    finish_reason_of,
    load_of,
    request_message,
)
from tokenwire.worker.tokenizer_files import unpack_tokenizer

__all__ = ["RemoteEngine"]

_RETRY_AFTER_S = 1.0


class RemoteEngine:
    """One remote worker as an engine; ``load()`` is what :meth:`poll` last read."""

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
    ) -> None:
        self.target = target
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        # Generate asks for fewer, larger messages when the engine is faster than that.
        self._generate_metadata = self._metadata + (
            ((MESSAGE_INTERVAL_KEY, f"{message_interval_ms:g}"),) if message_interval_ms else ()
        )
        self._credentials = credentials
        self._cache_dir = tokenizer_cache_dir
        self._timeout = timeout_s
        self._fetch_tokenizer = fetch_tokenizer
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.VllmEngineStub | None = None
        self._capabilities = Capabilities(model="", context_length=0)
        self._load = LoadReport()
        self.max_running = 0
        self.draining = False
        self.reports_loads = True  # False: the server has no GetLoads
        self.model_checked = False  # the router compared the worker's model with its own

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def load(self) -> LoadReport:
        return self._load

    def _open(self) -> pb_grpc.VllmEngineStub:
        if self._stub is None:
            options = [("grpc.max_receive_message_length", 16 << 20)]
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=options
                )
            self._stub = pb_grpc.VllmEngineStub(self._channel)
        return self._stub

    async def start(self) -> None:
        """Read the worker's model and (unless told not to) its tokenizer;
        UnavailableError when it cannot be reached."""
        stub = self._open()
        try:
            info = await stub.GetModelInfo(
                pb.GetModelInfoRequest(), metadata=self._metadata, timeout=self._timeout
            )
            tokenizer: TokenizerSource | None = None
            if self._fetch_tokenizer:
                tokenizer = await self._tokenizer(stub)
            await self.poll()
        except grpc.aio.AioRpcError as exc:
            raise _error_of(exc, self.target) from None
        self._capabilities = Capabilities(
            model=str(info.served_model_name or info.model_path),
            context_length=int(info.max_context_length),
            max_batch=self.max_running or 1,
            tokenizer=tokenizer,
        )

    async def _tokenizer(self, stub: pb_grpc.VllmEngineStub) -> TokenizerSource:
        call = stub.GetTokenizer(
            common_pb2.GetTokenizerRequest(), metadata=self._metadata, timeout=self._timeout * 12
        )
        pieces = [(chunk.data, chunk.sha256) async for chunk in call]
        return await asyncio.to_thread(unpack_tokenizer, pieces, self._cache_dir)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
        self._channel = self._stub = None

    async def model(self) -> str:
        """The model the worker serves (GetModelInfo); gRPC errors propagate."""
        info = await self._open().GetModelInfo(
            pb.GetModelInfoRequest(), metadata=self._metadata, timeout=self._timeout
        )
        return str(info.served_model_name or info.model_path)

    async def poll(self) -> LoadReport:
        """Read the worker's load now (GetLoads); gRPC errors propagate. A server
        without GetLoads (UNIMPLEMENTED) is asked for its health instead, and its
        load is what the router itself sent it (``reports_loads`` turns False)."""
        if not self.reports_loads:
            await self.healthy()
            return self._load
        try:
            reply = await self._open().GetLoads(
                pb.GetLoadsRequest(), metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self.reports_loads = False
            return await self.poll()
        self._load, max_running = load_of(reply.loads)
        self.max_running = max_running or self.max_running
        return self._load

    async def healthy(self) -> bool:
        """HealthCheck: False when the worker says it is unhealthy or draining."""
        reply = await self._open().HealthCheck(
            pb.HealthCheckRequest(), metadata=self._metadata, timeout=self._timeout
        )
        self.draining = not reply.healthy
        return bool(reply.healthy)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        metadata = self._generate_metadata
        if request.cache_scope or request.shared_prefix_tokens:
            metadata = (
                *metadata,
                (CACHE_SCOPE_KEY, request.cache_scope),
                (SHARED_PREFIX_KEY, str(request.shared_prefix_tokens)),
            )
        call = self._open().Generate(request_message(request), metadata=metadata)
        received = 0
        done = False
        try:
            async for response in call:
                if response.HasField("chunk"):
                    ids = tuple(response.chunk.token_ids)
                    if ids:
                        received += len(ids)
                        yield Chunk(ids)
                    continue
                end = response.complete
                # Cumulative output ids: anything past what the chunks carried is new.
                extra = tuple(end.output_ids[received:])
                done = True
                yield Chunk(
                    extra,
                    finish_reason_of(end.finish_reason),
                    int(end.prompt_tokens) or len(request.prompt_token_ids),
                    int(end.completion_tokens) or received + len(extra),
                )
                return
        except grpc.aio.AioRpcError as exc:
            done = True
            raise _error_of(exc, self.target, mid_answer=received > 0) from None
        finally:
            if not done:  # the consumer left: stop the worker's work within a step
                call.cancel()
                asyncio.get_running_loop().create_task(self._abort(request.request_id))
        raise UnavailableError(f"worker {self.target} ended an answer without finishing it")

    async def _abort(self, request_id: str) -> None:
        # Gone already (the cancelled call stopped it) or closed: nothing to do.
        if self._stub is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, AttributeError):
            await self._stub.Abort(
                pb.AbortRequest(request_ids=[request_id]),
                metadata=self._metadata,
                timeout=self._timeout,
            )


def _error_of(
    exc: grpc.aio.AioRpcError, target: str, *, mid_answer: bool = False
) -> TokenwireError:
    """A worker's status as the gateway's error (safe to show: no worker internals)."""
    code = exc.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(
            "the model's workers are at capacity; retry shortly", retry_after_s=_RETRY_AFTER_S
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT and not mid_answer:
        return InvalidArgumentError(f"the worker refused the request: {exc.details()}")
    where = "in the middle of an answer" if mid_answer else "before answering"
    return UnavailableError(f"a model worker failed {where} ({code.name}); retry")
