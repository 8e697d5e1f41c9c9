"""What the engine hands TensorRT-LLM's LLM API, and what it reads back from it.

Argument names follow NVIDIA/TensorRT-LLM: ``tensorrt_llm/llmapi/llm_args.py``
(BaseLlmArgs, TorchLlmArgs, KvCacheConfig), ``tensorrt_llm/sampling_params.py``
(SamplingParams) and ``tensorrt_llm/llmapi/llm.py`` (``LLM.generate_async``,
``LLM.args``, ``LLM.tokenizer``).
"""

from __future__ import annotations

import inspect
import json
import logging
import random
from pathlib import Path
from typing import Any

from tokenwire.backend import FinishReason, GenerateRequest
from tokenwire_tensorrt_llm.api import LLMApi
from tokenwire_tensorrt_llm.options import TensorRTLLMOptions

__all__ = [
    "FINISH_REASONS",
    "accepts_keyword",
    "context_length",
    "eos_ids",
    "llm_kwargs",
    "sampling_params",
]

_log = logging.getLogger("tokenwire_tensorrt_llm")

_FALLBACK_CONTEXT = 2048
# CompletionOutput.finish_reason (tensorrt_llm/executor/result.py) to ours. A
# timeout is the runtime's own deadline cutting the answer short.
FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "cancelled": FinishReason.CANCELLED,
    "timeout": FinishReason.CANCELLED,
}


def llm_kwargs(api: LLMApi, options: TensorRTLLMOptions, *, block_reuse: bool) -> dict[str, Any]:
    """Arguments for ``LLM(model, ...)`` besides the model."""
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "dtype": options.dtype,
        "trust_remote_code": options.trust_remote_code,
        "max_batch_size": options.max_running,
        "kv_cache_config": api.kv_cache_config(
            free_gpu_memory_fraction=options.free_gpu_memory_fraction,
            enable_block_reuse=block_reuse,
        ),
    }
    if options.tokenizer != options.model:
        kwargs["tokenizer"] = options.tokenizer
    if options.max_seq_len:
        kwargs["max_seq_len"] = options.max_seq_len
    if options.max_num_tokens:
        kwargs["max_num_tokens"] = options.max_num_tokens
    if options.runtime == "pytorch":
        # Off by default in TorchLlmArgs; without it get_stats_async yields nothing.
        kwargs["enable_iter_perf_stats"] = True
    return kwargs


def sampling_params(
    api: LLMApi, options: TensorRTLLMOptions, request: GenerateRequest, limit: int
) -> Any:
    """``SamplingParams`` for ``request``: token ids out, at most ``limit`` of them."""
    sampling = request.sampling
    kwargs: dict[str, Any] = {"max_tokens": limit, "detokenize": False}
    if request.stop_token_ids:
        kwargs["stop_token_ids"] = sorted(request.stop_token_ids)
    if options.end_id is not None:
        kwargs["end_id"] = options.end_id
    if options.pad_id is not None:
        kwargs["pad_id"] = options.pad_id
    if sampling.temperature <= 0.0:
        kwargs["top_k"] = 1  # greedy, as SamplingParams._greedy_decoding defines it
    else:
        kwargs["temperature"] = sampling.temperature
        kwargs["top_p"] = sampling.top_p
        if sampling.top_k > 0:
            kwargs["top_k"] = sampling.top_k
        # Unseeded, the runtime samples with seed 0 for every request: the same "random" answer.
        kwargs["seed"] = sampling.seed if sampling.seed is not None else random.getrandbits(32)
    return api.sampling_params(**kwargs)


def accepts_keyword(llm_class: Any, name: str) -> bool:
    """Whether ``llm_class.generate_async`` takes keyword ``name`` (``cache_salt`` is recent)."""
    try:
        parameters = inspect.signature(llm_class.generate_async).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return name in parameters


def eos_ids(llm: Any, end_id: int | None) -> frozenset[int]:
    """The end-of-sequence id: the option's, else the LLM's tokenizer's."""
    if end_id is not None:
        return frozenset({end_id})
    eos = getattr(getattr(llm, "tokenizer", None), "eos_token_id", None)
    return frozenset({eos}) if isinstance(eos, int) else frozenset()


def context_length(llm: Any, options: TensorRTLLMOptions) -> int:
    """The option, else the LLM's ``args.max_seq_len``, else the checkpoint's config.json."""
    if options.max_seq_len:
        return options.max_seq_len
    known = getattr(getattr(llm, "args", None), "max_seq_len", None)
    if isinstance(known, int) and known > 0:
        return known
    try:
        config = json.loads((Path(options.model) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for key in ("max_position_embeddings", "max_seq_len"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    _log.warning(
        "cannot tell %s's context length; assuming %d (set the option max_seq_len)",
        options.model,
        _FALLBACK_CONTEXT,
    )
    return _FALLBACK_CONTEXT
