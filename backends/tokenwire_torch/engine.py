"""The torch engine: token ids in, token ids out, on CPU or CUDA.

Torch is only ever driven from the engine's one worker thread. Two paths:

* **batched** (Llama models, the default): one scheduler steps every admitted
  request together over the own forward pass, a cache slot each
  (:mod:`tokenwire_torch.scheduler`, :mod:`tokenwire_torch.batching`);
* **one sequence per step** (``forward=transformers``, any architecture): each
  request has a producer task that submits its own decode steps, so requests
  interleave step by step.

Either way tokens land in the request's buffer and wake the consumer (the
``generate`` generator), which yields everything ready as one chunk::

    engine = create_engine(BackendConfig())
    await engine.start()
    async for chunk in engine.generate(GenerateRequest("r1", prompt_ids, max_tokens=32)):
        print(chunk.token_ids, chunk.finish_reason)
    await engine.close()
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

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
from tokenwire_torch.admitted import Admitted, Phase
from tokenwire_torch.source import ModelSource, provisional_model_name, resolve_model_source

if TYPE_CHECKING:
    from tokenwire_torch._runner import ModelRunner
    from tokenwire_torch.batching import Batcher
    from tokenwire_torch.scheduler import SlotScheduler

__all__ = ["TorchEngine"]

_log = logging.getLogger("tokenwire_torch")

_DTYPE_NAMES = frozenset({"auto", "float32", "bfloat16", "float16"})
# Backend-specific settings accepted in ``BackendConfig.options``.
_OPTION_NAMES = frozenset(
    {
        "model_name",
        "num_threads",
        "forward",
        "kv_cache_mb",
        "prefill_chunk",
        "weights",
        "prefix_cache",
        "quantized_rows",
        "compile",
        "small_step_rows",
        "switch_interval_us",
    }
)
_WEIGHTS = ("auto", "float", "fp16", "int8", "int4")
_SWITCHES = ("on", "off")
_FORWARDS = ("auto", "own", "transformers")
_TORCH_EXTRA_HINT = "pip install 'tokenwire[torch]'"
# Decode throughput in load() covers the steps that ended this recently.
_RATE_WINDOW_S = 5.0
_RETRY_AFTER_S = 1.0


class TorchEngine:
    """An :class:`~tokenwire.backend.Engine` running a transformers causal LM with torch.

    Construction is cheap and imports no torch; ``start()`` loads the model on
    the engine's worker thread. At most ``config.max_running`` requests are
    admitted at once (queued for prefill or generating); more are refused with
    :class:`ResourceExhaustedError` at their first iteration.

    ``capabilities`` before ``start()`` is provisional: the model name is known,
    ``context_length`` is 0 and there is no tokenizer source yet.

    ``config.options`` accepts (others are refused, so a typo fails at start-up):

    * ``model_name``: the name to report instead of the file or directory name;
    * ``num_threads``: torch's intra-op threads (default: one per core; fewer
      helps on a CPU shared with other busy processes);
    * ``small_step_rows``: decode steps of at most this many rows (default 4; 0:
      none) run on one thread fewer than ``num_threads`` (at least one) on a CPU,
      so a core stays free for the event loop that streams their tokens (on 2
      cores that is one thread, about 1.4x the tokens/s of one stream);
    * ``switch_interval_us``: lowers Python's GIL switch interval for the whole
      process to this at start (default 100; Python's own is 5000, never raised
      here). The engine's thread takes the GIL back after every torch op, and
      waits up to this long for it while the event loop runs Python;
    * ``forward``: ``auto`` (default: continuous batching over the own forward
      pass for Llama models, transformers for others), ``own`` or
      ``transformers`` (one sequence per step, any architecture);
    * ``kv_cache_mb``: the batching cache's budget (default 1024), split into
      ``max_running`` rows; a row's length is the context the engine reports;
    * ``prefill_chunk``: prompt tokens prefilled per step (default 256), the
      most a new prompt delays running streams by, per step;
    * ``prefix_cache``: ``on`` (default: a freed slot keeps its keys for a request
      that starts the same way, such as the conversation's next turn) or ``off``;
    * ``weights``: ``auto`` (default: ``int4`` on an x86 CPU with native bf16 or
      AVX2 when the file's layer weights are 4-bit, as the bundled GGUF's Q4_1 are,
      so they pack exactly; otherwise ``fp16`` where fbgemm runs and ``float``
      elsewhere), ``float`` (the configured dtype), ``fp16`` (every matmul through
      fbgemm's half-precision kernels, float32 activations and sums; x86 with AVX2,
      not with ``compile=on``), ``int8`` (per output row) or ``int4`` (groups of
      32). Quantized formats run on the CPU kernels (bf16 activations), and only
      for decode steps of at most ``quantized_rows`` rows; prompts and bigger
      batches use a dense copy of the same weights, where dense matmuls are
      faster: bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), fbgemm's halves
      where the dtype is float32 and fbgemm runs (2-4x float32's speed), float32
      elsewhere (unless ``dtype`` says otherwise);
    * ``quantized_rows``: the largest decode batch that uses the quantized
      weights (default 8, or 1 beside fbgemm's halves, which win past one row);
    * ``compile``: ``on`` compiles the decode step with ``torch.compile`` and
      runs it once per shape at start-up, so no request pays for compiling; on
      CUDA the step is captured as CUDA graphs. ``off`` (default): on a small
      CPU compiling takes minutes and the compiled step measured slower.
    """

    def __init__(self, config: BackendConfig) -> None:
        if config.dtype not in _DTYPE_NAMES:
            raise ConfigError(
                f"invalid dtype {config.dtype!r} for the torch backend; "
                f"use one of {', '.join(sorted(_DTYPE_NAMES))}"
            )
        if config.max_running < 1:
            raise ConfigError(f"max_running must be >= 1, got {config.max_running}")
        unknown = sorted(set(config.options) - _OPTION_NAMES)
        if unknown:
            raise ConfigError(
                f"unknown torch backend options {unknown}; known: {sorted(_OPTION_NAMES)}"
            )
        # 0: torch's default (one thread per core).
        self._num_threads = _positive_int(config.options, "num_threads", 0) or None
        self._forward = _choice(config.options, "forward", _FORWARDS, "auto")
        self._kv_cache_mb = _positive_int(config.options, "kv_cache_mb", 1024)
        self._prefill_chunk = _positive_int(config.options, "prefill_chunk", 256)
        self._prefix_cache = _choice(config.options, "prefix_cache", _SWITCHES, "on") == "on"
        self._compile = _choice(config.options, "compile", _SWITCHES, "off") == "on"
        self._weights = _choice(config.options, "weights", _WEIGHTS, "auto")
        # 0: the forward's default for its weights (8, or 1 beside fp16 dense weights)
        self._quantized_rows = _positive_int(config.options, "quantized_rows", 0)
        self._small_step_rows = _positive_int(config.options, "small_step_rows", 4, minimum=0)
        self._switch_interval_s = _positive_int(config.options, "switch_interval_us", 100) / 1e6
        self._scheduler: SlotScheduler | None = None
        self._weights_used: str | None = None
        self._config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwire-torch")
        self._start_lock = asyncio.Lock()
        self._runner: ModelRunner | None = None
        self._closed = False
        self._sequences: set[Admitted] = set()
        self._steps_executed = 0
        self._recent_steps: deque[tuple[float, float]] = deque()  # (start, end) per step
        self._load_seconds: float | None = None
        self._capabilities = Capabilities(
            model=provisional_model_name(config),
            context_length=0,
            max_batch=config.max_running,
        )

    # -- the Engine protocol ------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """Model name, context length, max batch and tokenizer source (final after start)."""
        return self._capabilities

    async def start(self) -> None:
        """Load the model on the worker thread; calling it again is a no-op.

        Raises :class:`ConfigError` when the model cannot be found or loaded, or
        when torch or transformers are missing.
        """
        async with self._start_lock:
            self._require_open()
            if self._runner is not None:
                return
            source = resolve_model_source(self._config)
            if sys.getswitchinterval() > self._switch_interval_s:
                sys.setswitchinterval(self._switch_interval_s)
            loop = asyncio.get_running_loop()
            began = time.perf_counter()
            runner = await loop.run_in_executor(self._executor, self._load, source)
            if self._closed:  # close() ran while the weights were loading
                runner.close()
                raise UnavailableError("the torch engine was closed while it was starting")
            batcher = await loop.run_in_executor(self._executor, self._build_batcher, runner)
            self._load_seconds = time.perf_counter() - began
            self._runner = runner
            context_length = runner.context_length
            if batcher is not None:  # a cache row holds prompt and answer
                from tokenwire_torch.scheduler import SlotScheduler

                self._scheduler = SlotScheduler(
                    batcher,
                    self._executor,
                    self._sequences,
                    prefix_cache=self._prefix_cache,
                    recent_steps=self._recent_steps,
                )
                context_length = self._scheduler.context_length
            self._capabilities = Capabilities(
                model=source.name,
                context_length=context_length,
                max_batch=self._config.max_running,
                tokenizer=TokenizerSource(path=str(source.directory), gguf_file=source.gguf_file),
            )
            _log.info(
                "loaded %s on %s in %.1f s (%s)",
                source.name,
                runner.device,
                self._load_seconds,
                "continuous batching" if batcher is not None else "one sequence per step",
            )

    async def close(self) -> None:
        """Stop every in-flight request (each within one step), then free the model.

        Consumers still iterating get :class:`UnavailableError`.
        """
        if self._closed:
            return
        self._closed = True
        producers = []
        for sequence in self._sequences:
            sequence.cancelled = True
            sequence.error = UnavailableError("the torch engine closed during generation")
            if sequence.producer is not None:
                producers.append(sequence.producer)
        if producers:
            await asyncio.wait(producers)
        runner, self._runner = self._runner, None
        if runner is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, runner.close)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def load(self) -> LoadReport:
        """Report running and queued requests, queued prompt tokens and recent tokens/s."""
        queued = [s for s in self._sequences if s.phase is Phase.QUEUED]
        running = len(self._sequences) - len(queued)
        scheduler = self._scheduler
        if scheduler is None:
            # No cache of its own to measure: occupied places stand in for KV-cache use.
            usage = running / self._config.max_running
            waiting = sum(len(s.request.prompt_token_ids) for s in queued)
        else:
            rows = [s.row for s in self._sequences if s.row is not None]
            llama = scheduler.batcher.llama
            usage = sum(r.position for r in rows) / (llama.slots * llama.max_len)
            waiting = sum(len(r.prompt) - r.position for r in rows if r.prefilling)
        return LoadReport(
            running=running,
            queued=len(queued),
            queued_tokens=waiting,
            kv_cache_usage=usage,
            tokens_per_second=self._decode_rate(),
        )

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Chunk, None]:
        """Generate tokens for ``request``, yielding whatever is ready as one chunk.

        Raises :class:`InvalidArgumentError` for an empty prompt, ``max_tokens <
        1`` or a prompt that fills the context; :class:`ResourceExhaustedError`
        when ``max_running`` requests are already admitted;
        :class:`InternalError` when torch fails during a step. Closing the
        generator or cancelling its task stops the work within one step.
        """
        sequence = self._admit(request)
        producer: asyncio.Future[None]
        if sequence.row is not None and self._scheduler is not None:
            producer = asyncio.get_running_loop().create_future()
            self._scheduler.wake()
        else:
            producer = asyncio.create_task(
                self._produce(sequence), name=f"tokenwire-torch:{request.request_id}"
            )
        sequence.producer = producer
        try:
            while True:
                await sequence.ready.wait()
                sequence.ready.clear()
                tokens = tuple(sequence.pending)
                sequence.pending.clear()
                if sequence.finish_reason is not None:
                    yield Chunk(
                        tokens,
                        sequence.finish_reason,
                        prompt_tokens=len(request.prompt_token_ids),
                        completion_tokens=sequence.completion_tokens,
                    )
                    return
                if sequence.error is not None:
                    if isinstance(sequence.error, TokenwireError):
                        raise sequence.error
                    raise InternalError(
                        f"the torch engine failed on request {request.request_id!r}"
                    ) from sequence.error
                if tokens:
                    yield Chunk(tokens)
        finally:
            # Reached on normal return, aclose() (GeneratorExit) and task
            # cancellation alike. Waiting for the producer (at most its one
            # in-flight step) means that when this returns, nothing runs for
            # the request any more and its KV cache is gone.
            sequence.cancelled = True
            await asyncio.wait({producer})

    # -- observability --------------------------------------------------------

    @property
    def steps_executed(self) -> int:
        """Forward passes run so far, all requests together (prefills included)."""
        batched = self._scheduler.steps_executed if self._scheduler is not None else 0
        return self._steps_executed + batched

    @property
    def load_seconds(self) -> float | None:
        """How long ``start()`` took to load the model; None before it has."""
        return self._load_seconds

    @property
    def prefix_cache_hits(self) -> int:
        """Prompt tokens whose keys came from the cache instead of a prefill, so far."""
        return self._scheduler.prefix_hits if self._scheduler is not None else 0

    @property
    def prefix_cache_lookups(self) -> int:
        """Prompt tokens of every request admitted so far (what the cache was asked for)."""
        return self._scheduler.prompt_tokens if self._scheduler is not None else 0

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the batching cache holds, preallocated at start (0 without batching)."""
        scheduler = self._scheduler
        return scheduler.batcher.llama.cache_bytes if scheduler is not None else 0

    @property
    def weights(self) -> str | None:
        """The weight format the batching path runs (``weights=auto`` resolved); None
        before ``start()`` and on the one-sequence-per-step path."""
        return self._weights_used

    @property
    def dense_weights(self) -> str | None:
        """What prompts and bigger decode batches run on: ``fp16`` (fbgemm's halves),
        ``float32`` or ``bfloat16``; None where :attr:`weights` is None."""
        scheduler = self._scheduler
        return scheduler.batcher.llama.dense if scheduler is not None else None

    @property
    def model(self) -> Any:
        """The loaded transformers model, for inspection; raises before ``start()``."""
        return self._require_runner().model

    # -- internals --------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise FailedPreconditionError("the torch engine is closed; create a new one")

    def _require_runner(self) -> ModelRunner:
        if self._runner is None:
            if self._closed:
                raise UnavailableError("the torch engine is closed")
            raise FailedPreconditionError("the torch engine is not started; await start() first")
        return self._runner

    def _load(self, source: ModelSource) -> ModelRunner:
        """Import torch lazily and load the model (runs on the worker thread)."""
        try:
            from tokenwire_torch._runner import ModelRunner
        except ImportError as exc:
            raise ConfigError(
                f"the torch backend needs torch and transformers ({exc}); "
                f"install them with: {_TORCH_EXTRA_HINT}"
            ) from exc
        try:
            return ModelRunner.load(
                source, self._config.device, self._config.dtype, num_threads=self._num_threads
            )
        except TokenwireError:
            raise
        except ImportError as exc:  # transformers asks for gguf only when reading one
            raise ConfigError(
                f"cannot load {source.name}: {exc}; install the extra: {_TORCH_EXTRA_HINT}"
            ) from exc
        except Exception as exc:
            where = source.directory / (source.gguf_file or "")
            raise ConfigError(f"cannot load the model at {where}: {exc}") from exc

    def _build_batcher(self, runner: ModelRunner) -> Batcher | None:
        """The own forward pass over a slotted cache, for a Llama model (worker thread);
        None when the option or the architecture says transformers."""
        model_type = getattr(runner.model.config, "model_type", "")
        if self._forward == "transformers" or (self._forward == "auto" and model_type != "llama"):
            return None
        import torch

        from tokenwire_torch.batching import Batcher
        from tokenwire_torch.llama import LlamaForward, cpu_has_avx2, cpu_has_bf16

        weights = self._weights
        on_cpu = runner.device.type == "cpu"
        cpu_bf16 = on_cpu and cpu_has_bf16()
        fallback = "float"  # for auto, when the file's layers are not 4-bit
        if weights == "auto":
            # A one-row decode step reads every weight: the file's own 4-bit weights
            # (they pack exactly, checked below) make it about a third faster than
            # the fastest dense format here, with native bf16 or AVX2 alike. Prompts
            # and bigger batches run dense: bf16 where the CPU runs it natively, else
            # fbgemm's halves (2-4x float32's speed at any batch size; fbgemm's ops
            # do not compile, so float32 with compile=on).
            mine = on_cpu and self._config.dtype == "auto"
            weights = "int4" if mine and (cpu_bf16 or cpu_has_avx2()) else "float"
            # Without native bf16 the dtype stays float32: fp16 where int4 has halves.
            halves = LlamaForward.dense_halves(torch.float32, self._compile)
            fallback = "fp16" if mine and not cpu_bf16 and halves else "float"
        # Dense matmuls (prompts, big batches) in bf16 only where the CPU runs bf16
        # natively; emulated, they are several times slower than float32 on many rows.
        dtype = (
            torch.bfloat16
            if weights in ("int8", "int4") and cpu_bf16 and self._config.dtype == "auto"
            else runner.model.dtype
        )
        per_token = LlamaForward.cache_bytes_per_token(runner.model.config, dtype)
        slots = self._config.max_running
        budget = self._kv_cache_mb * 1024 * 1024
        rows = slots + LlamaForward.scratch_slots(self._compile, runner.device)
        max_len = min(runner.context_length or 2048, budget // (rows * per_token))
        if max_len < 16:
            raise ConfigError(
                f"kv_cache_mb={self._kv_cache_mb} leaves {max_len} positions per request at "
                f"max_running={slots}; raise kv_cache_mb or lower max_running"
            )

        def build(weights: str, dtype: torch.dtype) -> LlamaForward:
            return LlamaForward(
                runner.model,
                slots=slots,
                max_len=max_len,
                dtype=dtype,
                device=runner.device,
                weights=weights,
                quantized_rows=self._quantized_rows or None,
                compile=self._compile,
            )

        llama: LlamaForward | None = None
        try:
            llama = build(weights, dtype)
        except ValueError as exc:
            if self._weights != "auto":
                raise ConfigError(f"cannot use weights={weights}: {exc}") from exc
        if llama is None or (self._weights == "auto" and llama.quantize_error > 0):
            # auto, and the layers are not 4-bit in the file (or do not pack)
            weights, llama = fallback, build(fallback, runner.model.dtype)
        self._weights_used = weights
        llama.warm_up()
        return Batcher(
            llama, prefill_chunk=self._prefill_chunk, small_step_rows=self._small_step_rows
        )

    def _admit(self, request: GenerateRequest) -> Admitted:
        """Check and register a request; no await here, so admission is atomic."""
        runner = self._require_runner()
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidArgumentError("the prompt has no tokens")
        if request.max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if runner.context_length and len(prompt) >= runner.context_length:
            raise InvalidArgumentError(
                f"the prompt has {len(prompt)} tokens; the context holds {runner.context_length}"
            )
        if len(self._sequences) >= self._config.max_running:
            raise ResourceExhaustedError(
                f"backend overloaded: {len(self._sequences)} requests running",
                retry_after_s=_RETRY_AFTER_S,
            )
        context = self._capabilities.context_length
        if self._scheduler is not None:
            if len(prompt) >= context:
                raise InvalidArgumentError(
                    f"the prompt has {len(prompt)} tokens; a cache row holds {context} "
                    "(raise the torch option kv_cache_mb, or lower max_running)"
                )
            sequence = Admitted(
                request=request,
                stop_token_ids=request.stop_token_ids | runner.eos_token_ids,
                state=None,
                limit=min(request.max_tokens, context - len(prompt)),
            )
            self._scheduler.place(sequence, prompt)
        else:
            sequence = Admitted(
                request=request,
                stop_token_ids=request.stop_token_ids | runner.eos_token_ids,
                state=runner.new_state(prompt, request.sampling),
            )
        self._sequences.add(sequence)
        return sequence

    async def _produce(self, sequence: Admitted) -> None:
        """Run decode steps for one request until it finishes, fails or is cancelled."""
        loop = asyncio.get_running_loop()
        request = sequence.request
        limit = request.max_tokens
        if self._runner is not None and self._runner.context_length:
            limit = min(limit, self._runner.context_length - len(request.prompt_token_ids))
        try:
            while not sequence.cancelled:
                began = time.monotonic()
                token = await loop.run_in_executor(self._executor, self._step, sequence)
                if token is None:  # cancelled while waiting for the worker thread
                    break
                sequence.phase = Phase.RUNNING
                self._recent_steps.append((began, time.monotonic()))
                if token in sequence.stop_token_ids:
                    sequence.finish_reason = FinishReason.STOP
                    break
                sequence.pending.append(token)
                sequence.completion_tokens += 1
                if sequence.completion_tokens >= limit:
                    sequence.finish_reason = FinishReason.LENGTH
                    break
                sequence.ready.set()
        except Exception as exc:
            _log.exception("torch step failed for request %r", request.request_id)
            # The traceback's frames hold the decode state as a local; clearing
            # them frees the KV cache now instead of whenever the error dies.
            traceback.clear_frames(exc.__traceback__)
            sequence.error = exc
        finally:
            # Dropping the state frees the KV cache; if this task was cancelled
            # mid-step, the worker thread lets go of it when the step returns.
            sequence.state = None
            self._sequences.discard(sequence)
            if sequence.finish_reason is None and sequence.error is None:
                sequence.error = UnavailableError("generation stopped before it finished")
            sequence.ready.set()

    def _step(self, sequence: Admitted) -> int | None:
        """One forward pass for ``sequence`` (runs on the worker thread)."""
        state, runner = sequence.state, self._runner
        if sequence.cancelled or state is None or runner is None:
            return None
        token = runner.step(state)
        # Only this thread writes the counters, so plain increments are safe.
        self._steps_executed += 1
        sequence.steps += 1
        return token

    def _decode_rate(self) -> float:
        now = time.monotonic()
        while self._recent_steps and self._recent_steps[0][1] < now - _RATE_WINDOW_S:
            self._recent_steps.popleft()
        if not self._recent_steps:
            return 0.0
        elapsed = max(now - self._recent_steps[0][0], 1e-6)
        return len(self._recent_steps) / elapsed


def _choice(options: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` for option ``name``, or ``default`` when it is not set."""
    value = options.get(name, "") or default
    if value not in choices:
        raise ConfigError(f"option {name} must be one of {choices}, got {value!r}")
    return value


def _positive_int(options: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    """An integer option of at least ``minimum`` (positive unless told otherwise), or
    ``default`` when it is not set."""
    value = options.get(name, "")
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"option {name} must be {kind}, got {value!r}")
    return number
