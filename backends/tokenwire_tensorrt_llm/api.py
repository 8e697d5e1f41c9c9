"""The three names the engine uses from TensorRT-LLM's LLM API, imported lazily.

Written against NVIDIA/TensorRT-LLM (1.x):

* ``tensorrt_llm.LLM`` (``tensorrt_llm/llmapi/llm.py``: the PyTorch runtime) and
  ``tensorrt_llm._tensorrt_engine.LLM`` (``_TrtLLM``, the TensorRT runtime), both
  ``LLM(model, tokenizer=..., tensor_parallel_size=..., **llm_args)`` with the
  remaining arguments from ``tensorrt_llm/llmapi/llm_args.py`` (BaseLlmArgs:
  ``pipeline_parallel_size``, ``kv_cache_config``, ``max_batch_size``,
  ``max_seq_len``, ``max_num_tokens``, ``dtype``, ``trust_remote_code``;
  TorchLlmArgs: ``enable_iter_perf_stats``);
* ``tensorrt_llm.SamplingParams`` (``tensorrt_llm/sampling_params.py``);
* ``tensorrt_llm.KvCacheConfig`` (``tensorrt_llm/llmapi/llm_args.py``:
  ``free_gpu_memory_fraction``, ``enable_block_reuse``).

Tests hand the engine an :class:`LLMApi` of stand-ins instead.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenwire.errors import ConfigError

__all__ = ["EXTRA_HINT", "LLMApi", "load_llm_api"]

EXTRA_HINT = "pip install 'tokenwire[tensorrt-llm]'"
_NEEDS = "the tensorrt-llm backend needs the tensorrt_llm package and an NVIDIA GPU with CUDA"


@dataclass(frozen=True, slots=True)
class LLMApi:
    """Constructors for an ``LLM``, its ``SamplingParams`` and its ``KvCacheConfig``."""

    llm: Callable[..., Any]
    sampling_params: Callable[..., Any]
    kv_cache_config: Callable[..., Any]


def load_llm_api(runtime: str, gpus: int) -> LLMApi:
    """Import ``tensorrt_llm`` for ``runtime`` after checking that ``gpus`` CUDA GPUs exist.

    Raises :class:`ConfigError` naming the extra to install when the package is
    missing, and the requirement when there is no (or too few) NVIDIA GPU.
    """
    if not _installed():
        raise ConfigError(f"{_NEEDS}; tensorrt_llm is not installed: {EXTRA_HINT}")
    found = _cuda_devices()
    if found < gpus:
        raise ConfigError(
            f"{_NEEDS}; this machine has {found} CUDA device(s) and the engine needs {gpus} "
            "(tensor_parallel_size x pipeline_parallel_size)"
        )
    try:
        package = importlib.import_module("tensorrt_llm")
        if runtime == "tensorrt":
            llm = importlib.import_module("tensorrt_llm._tensorrt_engine").LLM
        else:
            llm = package.LLM
        return LLMApi(
            llm=llm,
            sampling_params=package.SamplingParams,
            kv_cache_config=package.KvCacheConfig,
        )
    except Exception as exc:  # a broken install fails in many ways (OSError for CUDA libraries)
        raise ConfigError(f"{_NEEDS}; importing tensorrt_llm failed ({exc}): {EXTRA_HINT}") from exc


def _installed() -> bool:
    """Whether ``tensorrt_llm`` can be imported (found without importing it)."""
    return importlib.util.find_spec("tensorrt_llm") is not None


def _cuda_devices() -> int:
    """CUDA devices torch sees (tensorrt_llm depends on torch); 0 without torch."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
