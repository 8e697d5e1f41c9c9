"""TensorRT-LLM in-process, through its Python LLM API, as a Tokenwire engine.

Token ids in, token ids out: each request goes to ``LLM.generate_async`` with
``detokenize=False`` and ``streaming=True`` (as TensorRT-LLM's own gRPC server
does, ``tensorrt_llm/grpc/grpc_request_manager.py``), and one pump task per
request reads its ``RequestOutput`` (``tensorrt_llm/llmapi/llm.py``;
``tensorrt_llm/executor/result.py``: ``outputs[0].token_ids``,
``finish_reason``, ``finished``, ``abort()``) into a buffer. The consumer (the
``generate`` generator) yields everything in the buffer as one chunk, so a slow
consumer sees coalesced output::

    engine = create_engine(BackendConfig(name="tensorrt-llm", model_path="/models/qwen"))
    await engine.start()
    async for chunk in engine.generate(GenerateRequest("r1", prompt_ids, max_tokens=64)):
        print(chunk.token_ids, chunk.finish_reason)
    await engine.close()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from tokenwire.backend import (
    BackendConfig,
    Capabilities,
    Chunk,
    FinishReason,
    GenerateRequest,
    LoadReport,
    TokenizerSource,
)
from tokenwire.errors import (
    ConfigError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TokenwireError,
    UnavailableError,
)
from tokenwire_tensorrt_llm.api import LLMApi, load_llm_api
from tokenwire_tensorrt_llm.mapping import (
    FINISH_REASONS,
    accepts_keyword,
    context_length,
    eos_ids,
    llm_kwargs,
    sampling_params,
)
from tokenwire_tensorrt_llm.options import TensorRTLLMOptions, read_options
from tokenwire_tensorrt_llm.stats import RuntimeStats, poll_stats

__all__ = ["TensorRTLLMEngine"]

_log = logging.getLogger("tokenwire_tensorrt_llm")

_RETRY_AFTER_S = 1.0
_RATE_WINDOW_S = 5.0  # load()'s tokens/s covers tokens streamed this recently
# How long an aborted request may take to come back from the runtime as cancelled
# (it is aborted at the runtime's next iteration) before it is given up on.
_ABORT_WAIT_S = 5.0


@dataclass(eq=False, slots=True)
class _Stream:
    """One request in flight: what the pump has read and the consumer not yet taken."""

    request: GenerateRequest
    result: Any  # the LLM's RequestOutput
    limit: int
    stop_ids: frozenset[int]
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pending: list[int] = field(default_factory=list)
    seen: int = 0  # output token ids read so far
    completion_tokens: int = 0
    started: bool = False  # the runtime sent output: it is scheduled, not queued
    finish: FinishReason | None = None
    error: BaseException | None = None
    aborted: bool = False
    done: bool = False  # the runtime is finished with the request
    pump: asyncio.Task[None] | None = None


class TensorRTLLMEngine:
    """An :class:`~tokenwire.backend.Engine` over ``tensorrt_llm.LLM``.

    Construction is cheap and imports nothing of TensorRT-LLM; ``start()``
    imports it (or uses ``llm_api``, for tests), checks for CUDA GPUs and builds
    the ``LLM``. At most ``max_running`` requests are admitted at once (the
    runtime's ``max_batch_size``); more are refused with
    :class:`ResourceExhaustedError`. ``tokenizer`` overrides the tokenizer
    source reported to the gateway (default: the ``tokenizer`` option, else
    ``model_path``). See :data:`tokenwire_tensorrt_llm.options.OPTION_HELP`
    for the options.

    ``load()`` counts the engine's own requests (exact, no await needed) and
    splits them into running and queued, and reads KV-cache use, from the
    runtime's iteration stats, which a background task polls.
    """

    def __init__(
        self,
        config: BackendConfig,
        *,
        llm_api: LLMApi | None = None,
        tokenizer: TokenizerSource | None = None,
    ) -> None:
        self._options: TensorRTLLMOptions = read_options(config)
        self._api = llm_api
        self._tokenizer = tokenizer
        self._llm: Any = None
        self._salted = False
        self._eos: frozenset[int] = frozenset()
        self._streams: set[_Stream] = set()
        self._stats = RuntimeStats()
        self._submitted = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._started_at = time.monotonic()
        self._recent: deque[tuple[float, int]] = deque()  # (when, tokens) read from the runtime
        self._capabilities = Capabilities(
            model=self._options.model_name,
            context_length=0,
            max_batch=self._options.max_running,
        )

    # -- the Engine protocol ------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """Model name, context length, max batch and tokenizer source (final after start)."""
        return self._capabilities

    @property
    def options(self) -> TensorRTLLMOptions:
        """The validated settings this engine was built with."""
        return self._options

    async def start(self) -> None:
        """Build the ``LLM``; calling it again is a no-op.

        Raises :class:`ConfigError` when tensorrt_llm or a CUDA GPU is missing,
        when ``model_path`` is empty, or when the model cannot be loaded.
        """
        async with self._start_lock:
            self._require_open()
            if self._llm is not None:
                return
            options = self._options
            api = self._api or load_llm_api(options.runtime, options.gpus)
            self._api = api
            if not options.model:
                raise ConfigError(
                    "the tensorrt-llm backend needs backend.model_path: a Hugging Face checkpoint "
                    "directory or hub name (runtime=pytorch), or a TensorRT engine directory "
                    "(runtime=tensorrt)"
                )
            self._salted = options.prefix_cache and accepts_keyword(api.llm, "cache_salt")
            if options.prefix_cache and not self._salted:
                _log.warning(
                    "this TensorRT-LLM has no cache_salt: KV-cache block reuse is off, so one "
                    "conversation's prompts cannot speed up another's"
                )
            began = time.perf_counter()
            # Built on the event loop's thread, as NVIDIA Dynamo's TensorRT-LLM worker
            # does: the executor binds its response queues to the running loop.
            try:
                llm = api.llm(options.model, **llm_kwargs(api, options, block_reuse=self._salted))
            except TokenwireError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"TensorRT-LLM cannot load {options.model!r} (runtime={options.runtime}): {exc}"
                ) from exc
            self._llm = llm
            self._started_at = time.monotonic()
            self._eos = eos_ids(llm, options.end_id)
            self._capabilities = Capabilities(
                model=options.model_name,
                context_length=context_length(llm, options),
                max_batch=options.max_running,
                tokenizer=self._tokenizer or TokenizerSource(path=options.tokenizer),
            )
            poller = poll_stats(
                llm.get_stats_async, self._stats, options.stats_interval_s, self._submitted
            )
            self._poller = asyncio.create_task(poller, name="tokenwire-tensorrt-llm:stats")
            _log.info(
                "loaded %s with TensorRT-LLM (%s runtime, %d GPU(s)) in %.1f s",
                options.model,
                options.runtime,
                options.gpus,
                time.perf_counter() - began,
            )

    async def close(self) -> None:
        """Abort every request in flight, then shut the ``LLM`` down.

        Consumers still iterating get what was made so far, then
        :class:`UnavailableError`. The ``LLM`` shuts down in a thread: it blocks
        while the runtime's workers stop.
        """
        if self._closed:
            return
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
        pumps = []
        for stream in list(self._streams):
            stream.error = UnavailableError("the tensorrt-llm engine closed during generation")
            self._abort(stream)
            if stream.pump is not None:
                pumps.append(stream.pump)
        if pumps:
            _, late = await asyncio.wait(pumps, timeout=_ABORT_WAIT_S)
            for pump in late:
                pump.cancel()
        llm, self._llm = self._llm, None
        if llm is not None:
            # LLM.shutdown (tensorrt_llm/llmapi/llm.py) shuts the executor down and
            # then the MPI session: the executor proxy aborts what is left through its
            # IPC queue, waits for its worker processes and joins its dispatch threads,
            # which hand results to the loop only with call_soon_threadsafe. It needs
            # nothing of the loop's thread and takes seconds, so it runs in a thread
            # while the loop serves everything else.
            await asyncio.to_thread(llm.shutdown)

    def load(self) -> LoadReport:
        """Running and queued requests, queued prompt tokens, KV-cache use and tokens/s."""
        waiting = [s for s in self._streams if not s.started]
        # The runtime's count is one poll old; a request that already sent output
        # is running whatever it said.
        queued = min(len(waiting), self._stats.queued)
        return LoadReport(
            running=len(self._streams) - queued,
            queued=queued,
            queued_tokens=sum(len(s.request.prompt_token_ids) for s in waiting),
            kv_cache_usage=self._stats.kv_cache_usage,
            tokens_per_second=self._token_rate(),
        )

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Chunk, None]:
        """Generate tokens for ``request``, yielding whatever is ready as one chunk.

        Raises :class:`InvalidArgumentError` for an empty prompt, ``max_tokens <
        1``, a prompt that fills the context or arguments the runtime refuses;
        :class:`ResourceExhaustedError` when ``max_running`` requests are in
        flight; :class:`InternalError` when the runtime fails, once the tokens
        made before the failure are yielded. Closing the generator or cancelling
        its task aborts the request in the runtime.
        """
        stream = self._admit(request)
        try:
            while True:
                await stream.ready.wait()
                stream.ready.clear()
                tokens = tuple(stream.pending)
                stream.pending.clear()
                if stream.error is not None:
                    if tokens:  # send what came before the failure, then fail
                        yield Chunk(tokens)
                    raise _client_error(stream)
                if stream.done:
                    yield Chunk(
                        tokens,
                        stream.finish,
                        prompt_tokens=len(request.prompt_token_ids),
                        completion_tokens=stream.completion_tokens,
                    )
                    return
                if tokens:
                    yield Chunk(tokens)
        finally:
            # Reached on return, aclose() and task cancellation alike: unless the
            # runtime is done with the request, abort it and wait (bounded) until
            # it says so, which frees its KV-cache blocks.
            if not stream.done:
                self._abort(stream)
                assert stream.pump is not None
                _, late = await asyncio.wait({stream.pump}, timeout=_ABORT_WAIT_S)
                if late:
                    _log.warning("request %r did not end after its abort", request.request_id)
                    stream.pump.cancel()
                    self._streams.discard(stream)

    # -- internals --------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise FailedPreconditionError("the tensorrt-llm engine is closed; create a new one")

    def _admit(self, request: GenerateRequest) -> _Stream:
        """Check ``request``, submit it and start its pump; no await, so admission is atomic."""
        llm, api = self._llm, self._api
        if llm is None or api is None:
            if self._closed:
                raise UnavailableError("the tensorrt-llm engine is closed")
            raise FailedPreconditionError("the tensorrt-llm engine is not started; await start()")
        prompt = list(request.prompt_token_ids)
        context = self._capabilities.context_length
        if not prompt:
            raise InvalidArgumentError("the prompt has no tokens")
        if request.max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if len(prompt) >= context:
            raise InvalidArgumentError(
                f"the prompt has {len(prompt)} tokens; the context holds {context}"
            )
        if len(self._streams) >= self._options.max_running:
            raise ResourceExhaustedError(
                f"backend overloaded: {len(self._streams)} requests running",
                retry_after_s=_RETRY_AFTER_S,
            )
        limit = min(request.max_tokens, context - len(prompt))
        extra: dict[str, Any] = {}
        if self._salted:
            # Blocks are reused only under the same salt: the conversation's scope,
            # or the request alone when it has none.
            extra["cache_salt"] = request.cache_scope or f"request:{request.request_id}"
        try:
            result = llm.generate_async(
                {"prompt_token_ids": prompt},
                sampling_params=sampling_params(api, self._options, request, limit),
                streaming=True,
                **extra,
            )
        except ValueError as exc:  # the LLM API's argument checks
            raise InvalidArgumentError(f"TensorRT-LLM refused the request: {exc}") from exc
        except RuntimeError as exc:  # "LLM is shutting down"
            raise UnavailableError(f"TensorRT-LLM cannot take requests: {exc}") from exc
        self._submitted.set()
        stream = _Stream(request, result, limit, request.stop_token_ids | self._eos)
        self._streams.add(stream)
        stream.pump = asyncio.create_task(
            self._pump(stream), name=f"tokenwire-tensorrt-llm:{request.request_id}"
        )
        return stream

    async def _pump(self, stream: _Stream) -> None:
        """Read the runtime's responses for ``stream`` until it is finished."""
        responses = aiter(stream.result)
        try:
            while True:
                # Once the answer ended here (a stop token the runtime did not stop
                # on), only the abort's last response is awaited, and not forever.
                wait = None if stream.finish is None else _ABORT_WAIT_S
                try:
                    output = await asyncio.wait_for(anext(responses), wait)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    _log.warning("request %r: no reply to its abort", stream.request.request_id)
                    break
                completion = output.outputs[0]
                token_ids = completion.token_ids
                new, stream.seen = token_ids[stream.seen :], len(token_ids)
                stream.started = True
                if stream.finish is None:
                    stream.finish = self._take(stream, new)
                    if stream.finish is None and output.finished:
                        stream.finish = FINISH_REASONS.get(
                            completion.finish_reason, FinishReason.ERROR
                        )
                    elif stream.finish is not None and not output.finished:
                        self._abort(stream)
                    stream.ready.set()
                if output.finished:
                    break
        except Exception as exc:
            _log.exception("TensorRT-LLM failed on request %r", stream.request.request_id)
            stream.error = exc
        finally:
            stream.done = True
            self._streams.discard(stream)
            if stream.finish is None and stream.error is None:
                stream.error = UnavailableError("generation stopped before it finished")
            stream.ready.set()

    def _take(self, stream: _Stream, tokens: list[int]) -> FinishReason | None:
        """Buffer ``tokens`` up to a stop token or the length limit; say which ended it."""
        finish = None
        taken = 0
        for token in tokens:
            if token in stream.stop_ids:
                finish = FinishReason.STOP
                break
            stream.pending.append(token)
            taken += 1
            if stream.completion_tokens + taken >= stream.limit:
                finish = FinishReason.LENGTH
                break
        stream.completion_tokens += taken
        if taken:
            self._recent.append((time.monotonic(), taken))
        return finish

    def _abort(self, stream: _Stream) -> None:
        if stream.aborted or stream.done:
            return
        stream.aborted = True
        try:
            stream.result.abort()
        except Exception:
            _log.warning("aborting request %r failed", stream.request.request_id, exc_info=True)

    def _token_rate(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
            self._recent.popleft()
        span = min(_RATE_WINDOW_S, max(now - self._started_at, 1.0))
        return sum(n for _, n in self._recent) / span


def _client_error(stream: _Stream) -> TokenwireError:
    error = stream.error
    if isinstance(error, TokenwireError):
        return error
    failure = InternalError(f"TensorRT-LLM failed on request {stream.request.request_id!r}")
    failure.__cause__ = error
    return failure
