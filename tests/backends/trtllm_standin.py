"""A stand-in for TensorRT-LLM's Python LLM API, for tests without a GPU.

Not TensorRT-LLM: a small imitation of the surface ``tokenwire_tensorrt_llm``
uses, shaped after NVIDIA/TensorRT-LLM's documented behaviour:

* ``StandInLLM(model, tokenizer=None, tensor_parallel_size=1, dtype="auto",
  **kwargs)`` refuses arguments the real ``LLM`` does not take (``ValueError``,
  as ``BaseLLM.__init__`` does); ``args.max_seq_len``, ``tokenizer.eos_token_id``,
  ``shutdown()`` (which blocks ``shutdown_s``, a stand-in knob, as the real one
  waits for its workers and threads to stop);
* ``generate_async(inputs, sampling_params=None, ..., streaming=False, ...,
  cache_salt=None)`` returns a ``StandInRequestOutput``: async-iterable, one
  response per engine iteration when streaming, with ``outputs[0].token_ids``,
  ``token_ids_diff``, ``finish_reason`` ('stop', 'length', 'cancelled'),
  ``stop_reason``, ``finished``, ``abort()`` (``tensorrt_llm/executor/result.py``);
* a stop token id or ``end_id`` ends the answer with 'stop' and is not in
  ``token_ids`` (``include_stop_str_in_output`` is False); ``max_tokens`` ends
  it with 'length'; an aborted request ends at the next iteration with
  'cancelled'; with ``fail_after`` (a stand-in knob) a request fails right after
  its Nth token: iterating its output raises ``StandInRequestError``, as the real
  one raises ``RequestError`` for a response with an error;
* ``get_stats_async(timeout)`` yields one stats dict per iteration, in the real
  field names, until ``timeout`` passes without one; before the first request
  it yields nothing, and after a timeout nothing until the next request
  (``IterationResult``).

Generation is in-flight batching over a deterministic generator, one token per
request per iteration, each iteration paced by ``asyncio.sleep(step_s)``: the
greedy answer depends only on the prompt, a sampled one only on the seed (the
runtime's default seed is 0). At most ``max_batch_size``
requests run (or ``batch_limit``, a stand-in knob); the rest queue.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from tokenwire_tensorrt_llm import LLMApi

__all__ = [
    "STANDIN_API",
    "StandInCompletionOutput",
    "StandInKvCacheConfig",
    "StandInLLM",
    "StandInRequestError",
    "StandInRequestOutput",
    "StandInSamplingParams",
    "greedy_answer",
]

EOS = 256  # the stand-in model's end-of-sequence id (the byte tokenizer's, too)
NATURAL_LENGTH = 64  # a greedy answer ends with EOS after this many tokens
TOKENS_PER_BLOCK = 32
KV_BLOCKS = 64
_STATS_KEPT = 1000  # iter_stats_max_iterations' default

# Arguments the real LLM takes (BaseLlmArgs / TorchLlmArgs) that the engine may pass.
_LLM_ARGS = frozenset(
    {
        "pipeline_parallel_size",
        "trust_remote_code",
        "kv_cache_config",
        "max_batch_size",
        "max_seq_len",
        "max_num_tokens",
        "enable_iter_perf_stats",
    }
)


@dataclass(kw_only=True)
class StandInSamplingParams:
    """The ``tensorrt_llm.SamplingParams`` fields the engine sets (same names, defaults)."""

    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop_token_ids: list[int] | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    detokenize: bool = True

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id


@dataclass(kw_only=True)
class StandInKvCacheConfig:
    """The ``tensorrt_llm.KvCacheConfig`` fields the engine sets."""

    free_gpu_memory_fraction: float | None = 0.9
    enable_block_reuse: bool = True

    def __post_init__(self) -> None:
        fraction = self.free_gpu_memory_fraction
        if fraction is not None and not 0 <= fraction <= 1:
            raise ValueError("kv_cache_config.free_gpu_memory_fraction must be between 0 and 1")


@dataclass
class StandInCompletionOutput:
    """``CompletionOutput``: one answer's token ids so far and why it ended."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    _last_token_ids_len: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]


class StandInRequestError(RuntimeError):
    """``RequestError``: the runtime failed on a request."""


@dataclass
class _Response:
    tokens: list[int]
    finish_reason: str | None
    stop_reason: int | None
    final: bool
    error: str | None = None


class StandInRequestOutput:
    """``RequestOutput``: iterate it for the responses; ``abort()`` cancels the request."""

    def __init__(self, llm: StandInLLM, request_id: int, prompt: list[int], streaming: bool):
        self.request_id = request_id
        self.prompt = None
        self.prompt_token_ids = prompt
        self.outputs = [StandInCompletionOutput(0)]
        self._llm = llm
        self._streaming = streaming
        self._queue: asyncio.Queue[_Response] = asyncio.Queue()
        self._done = False
        self._aborted = False

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Cancel the request; the engine ends it at its next iteration."""
        self._llm._abort(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    def __aiter__(self) -> StandInRequestOutput:
        return self

    async def __anext__(self) -> StandInRequestOutput:
        if self._done:
            raise StopAsyncIteration
        self._handle(await self._queue.get())
        return self

    async def aresult(self) -> StandInRequestOutput:
        while not self._done:
            self._handle(await self._queue.get())
        return self

    def _handle(self, response: _Response) -> None:
        output = self.outputs[0]
        output._last_token_ids_len = len(output.token_ids)
        output.token_ids.extend(response.tokens)
        self._done = response.final
        if response.error is not None:
            raise StandInRequestError(response.error)
        if response.final:
            output.finish_reason = response.finish_reason
            output.stop_reason = response.stop_reason


class _StatsResult:
    """``IterationResult``: stats dicts until ``timeout`` passes without one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.timeout = 2.0
        self.done = False

    def __aiter__(self) -> _StatsResult:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.done:
            raise StopAsyncIteration
        try:
            return await asyncio.wait_for(self.queue.get(), self.timeout)
        except TimeoutError:
            self.done = True
            raise StopAsyncIteration from None


class _Nothing:
    def __aiter__(self) -> _Nothing:
        return self

    async def __anext__(self) -> dict[str, Any]:
        raise StopAsyncIteration


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: StandInSamplingParams
    output: StandInRequestOutput
    rng: random.Random | None
    generated: list[int] = field(default_factory=list)
    aborted: bool = False


class StandInLLM:
    """``tensorrt_llm.LLM`` without a GPU: in-flight batching over a toy generator."""

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        *,
        step_s: float = 0.002,
        batch_limit: int | None = None,
        fail_after: int | None = None,
        shutdown_s: float = 0.0,
        **kwargs: Any,
    ) -> None:
        for key in kwargs:
            if key not in _LLM_ARGS:
                raise ValueError(f"{type(self).__name__} got invalid argument: {key}")
        self.model = model
        self.kwargs = {"tokenizer": tokenizer, "tensor_parallel_size": tensor_parallel_size,
                       "dtype": dtype, **kwargs}  # fmt: skip
        self.args = SimpleNamespace(model=model, max_seq_len=kwargs.get("max_seq_len") or 4096)
        self.tokenizer = SimpleNamespace(eos_token_id=EOS)
        self.max_batch_size = batch_limit or int(kwargs.get("max_batch_size") or 8)
        self.step_s = step_s
        self.fail_after = fail_after
        self.shutdown_s = shutdown_s
        self.submitted: list[tuple[list[int], StandInSamplingParams, str | None]] = []
        self.aborted_ids: list[int] = []
        self.iterations = 0
        self._next_id = 0
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._by_id: dict[int, _Request] = {}
        self._stats: _StatsResult | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._shut = False

    @property
    def unfinished(self) -> int:
        """Requests the engine still holds (queued or running)."""
        return len(self._by_id)

    def generate_async(
        self,
        inputs: Any,
        sampling_params: StandInSamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: Any = None,
        _postproc_params: Any = None,
        scheduling_params: Any = None,
        cache_salt: str | None = None,
    ) -> StandInRequestOutput:
        """Queue one prompt (``{"prompt_token_ids": [...]}`` or a list of ids)."""
        if self._shut:
            raise RuntimeError("LLM is shutting down")
        prompt = list(inputs["prompt_token_ids"] if isinstance(inputs, dict) else inputs)
        params = sampling_params or StandInSamplingParams()
        if params.end_id is None:
            params.end_id = EOS
            params.pad_id = params.pad_id if params.pad_id is not None else EOS
        if len(prompt) + params.max_tokens > self.args.max_seq_len:
            raise ValueError(
                "The sum of prompt length and max_tokens should not exceed max_seq_len"
            )
        self.submitted.append((prompt, params, cache_salt))
        self._next_id += 1
        output = StandInRequestOutput(self, self._next_id, prompt, streaming)
        sampled = not (params.top_k in (None, 1) and params.top_p in (None, 0.0))
        rng = random.Random(params.seed or 0) if sampled else None
        request = _Request(self._next_id, prompt, params, output, rng)
        self._by_id[request.id] = request
        self._waiting.append(request)
        if self._stats is None:
            self._stats = _StatsResult()
        else:
            self._stats.done = False  # mark_undone: more stats are coming
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        return output

    def get_stats_async(self, timeout: float | None = 2) -> Any:
        """The iteration stats, as an async iterable of dicts."""
        if self._stats is None:
            return _Nothing()
        self._stats.timeout = 2.0 if timeout is None else timeout
        return self._stats

    def shutdown(self) -> None:
        time.sleep(self.shutdown_s)
        self._shut = True
        if self._loop_task is not None:
            self._loop_task.cancel()

    def _abort(self, request_id: int) -> None:
        request = self._by_id.get(request_id)
        if request is not None:
            request.aborted = True
            self.aborted_ids.append(request_id)

    async def _run(self) -> None:
        """The executor loop: one iteration per ``step_s`` while anything is held."""
        while self._by_id:
            await asyncio.sleep(self.step_s)
            self._iterate()

    def _iterate(self) -> None:
        self.iterations += 1
        while self._waiting and len(self._running) < self.max_batch_size:
            self._running.append(self._waiting.popleft())
        for request in [r for r in self._waiting if r.aborted]:
            self._waiting.remove(request)
            self._finish(request, [], "cancelled", None)
        completed = 0
        for request in list(self._running):
            if request.aborted:
                self._finish(request, [], "cancelled", None)
                continue
            token = _next_token(request)
            params = request.params
            stops = set(params.stop_token_ids or ())
            if token in stops or token == params.end_id:
                self._finish(request, [], "stop", token if token in stops else None)
            elif len(request.generated) + 1 >= params.max_tokens:
                self._finish(request, [token], "length", None)
            else:
                request.generated.append(token)
                if request.output._streaming:
                    request.output._queue.put_nowait(_Response([token], None, None, False))
                if len(request.generated) == self.fail_after:
                    self._fail(request)
                continue
            completed += 1
        self._record_stats(completed)

    def _finish(
        self, request: _Request, tokens: list[int], reason: str, stop_reason: int | None
    ) -> None:
        if request in self._running:
            self._running.remove(request)
        del self._by_id[request.id]
        request.generated.extend(tokens)
        sent = tokens if request.output._streaming else request.generated
        request.output._queue.put_nowait(_Response(sent, reason, stop_reason, True))

    def _fail(self, request: _Request) -> None:
        self._running.remove(request)
        del self._by_id[request.id]
        error = _Response([], None, None, True, error="injected runtime failure")
        request.output._queue.put_nowait(error)

    def _record_stats(self, completed: int) -> None:
        if self._stats is None:
            return
        used = sum(
            math.ceil((len(r.prompt) + len(r.generated)) / TOKENS_PER_BLOCK) for r in self._running
        )
        used = min(used, KV_BLOCKS)
        if self._stats.queue.qsize() >= _STATS_KEPT:
            self._stats.queue.get_nowait()
        self._stats.queue.put_nowait(
            {
                "iter": self.iterations,
                "iterLatencyMS": self.step_s * 1000,
                "numActiveRequests": len(self._running),
                "numQueuedRequests": len(self._waiting),
                "numCompletedRequests": completed,
                "maxNumActiveRequests": self.max_batch_size,
                "gpuMemUsage": 0,
                "cpuMemUsage": 0,
                "pinnedMemUsage": 0,
                "kvCacheStats": {
                    "maxNumBlocks": KV_BLOCKS,
                    "freeNumBlocks": KV_BLOCKS - used,
                    "usedNumBlocks": used,
                    "tokensPerBlock": TOKENS_PER_BLOCK,
                    "allocTotalBlocks": used,
                    "allocNewBlocks": 0,
                    "reusedBlocks": 0,
                    "cacheHitRate": 0.0,
                },
                "inflightBatchingStats": {
                    "numScheduledRequests": len(self._running),
                    "numContextRequests": 0,
                    "numGenRequests": len(self._running),
                    "numPausedRequests": 0,
                    "numCtxTokens": 0,
                    "microBatchId": 0,
                    "avgNumDecodedTokensPerIter": 1.0,
                },
            }
        )


def greedy_answer(prompt: Sequence[int], length: int) -> list[int]:
    """The stand-in model's greedy answer to ``prompt``: its first ``length`` tokens."""
    request = _Request(0, list(prompt), StandInSamplingParams(top_k=1), None, None)  # type: ignore[arg-type]
    for _ in range(length):
        request.generated.append(_next_token(request))
    return request.generated


def _next_token(request: _Request) -> int:
    """Printable ASCII from a hash of prompt and position; EOS after NATURAL_LENGTH tokens."""
    position = len(request.generated)
    if position >= NATURAL_LENGTH:
        return EOS
    if request.rng is not None:
        return 32 + request.rng.randrange(95)
    mixed = 0
    for token in request.prompt:
        mixed = (mixed * 131 + token + 7) % 1_000_003
    return 32 + (mixed * (position + 17) + position * position * 31) % 95


STANDIN_API = LLMApi(
    llm=StandInLLM, sampling_params=StandInSamplingParams, kv_cache_config=StandInKvCacheConfig
)
