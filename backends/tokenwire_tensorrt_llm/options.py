"""The TensorRT-LLM backend's settings, read once from ``BackendConfig``.

``backend.model_path`` names the model (a Hugging Face checkpoint directory or
hub name for the PyTorch runtime, a TensorRT engine or checkpoint directory for
the TensorRT runtime); everything else comes from ``backend.options``, each
entry documented in :data:`OPTION_HELP`. Unknown entries and bad values are a
:class:`~tokenwire.errors.ConfigError`, so a typo fails at start-up::

    options = read_options(BackendConfig(name="tensorrt-llm", model_path="/models/qwen",
                                         options={"tensor_parallel_size": "2"}))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath

from tokenwire.backend import BackendConfig
from tokenwire.errors import ConfigError

__all__ = ["OPTION_HELP", "RUNTIMES", "TensorRTLLMOptions", "read_options"]

RUNTIMES = ("pytorch", "tensorrt")
_DTYPES = ("auto", "float16", "bfloat16", "float32")
_SWITCHES = ("on", "off")

# Every option, its default (as written in ``options``) and its help text.
OPTION_HELP: dict[str, tuple[str, str]] = {
    "runtime": (
        "pytorch",
        "pytorch: tensorrt_llm.LLM (the PyTorch runtime, Hugging Face checkpoints); "
        "tensorrt: tensorrt_llm._tensorrt_engine.LLM (TensorRT engines or checkpoints)",
    ),
    "tokenizer": (
        "",
        "transformers tokenizer directory (or hub name) for the gateway and the LLM; "
        "empty: backend.model_path",
    ),
    "model_name": ("", "the model name to report; empty: the last part of backend.model_path"),
    "tensor_parallel_size": ("1", "GPUs each layer is split across (LLM tensor_parallel_size)"),
    "pipeline_parallel_size": (
        "1",
        "pipeline stages the layers are split into (LLM pipeline_parallel_size)",
    ),
    "free_gpu_memory_fraction": (
        "0.9",
        "share of the GPU memory left after loading the weights that the KV cache takes "
        "(KvCacheConfig free_gpu_memory_fraction), in (0, 1]",
    ),
    "max_seq_len": (
        "0",
        "longest prompt plus answer, in tokens (LLM max_seq_len); 0: the model's own",
    ),
    "max_num_tokens": (
        "0",
        "most tokens one engine iteration batches (LLM max_num_tokens); 0: TensorRT-LLM's default",
    ),
    "prefix_cache": (
        "on",
        "on: KV-cache blocks are reused between requests of the same cache scope "
        "(the conversation), salted per scope so one conversation's prompts never speed up "
        "another's; off: no block reuse",
    ),
    "end_id": ("", "the end-of-sequence token id; empty: the model's (from its tokenizer)"),
    "pad_id": ("", "the padding token id; empty: the model's, else end_id"),
    "trust_remote_code": ("off", "on: let transformers run the checkpoint's own model code"),
    "stats_interval_ms": (
        "500",
        "how often the runtime's iteration stats (queue, KV-cache blocks) are read "
        "in the background for load()",
    ),
}


@dataclass(frozen=True, slots=True)
class TensorRTLLMOptions:
    """Validated settings for one TensorRT-LLM engine."""

    model: str
    model_name: str
    tokenizer: str
    runtime: str = "pytorch"
    dtype: str = "auto"
    max_running: int = 8
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    free_gpu_memory_fraction: float = 0.9
    max_seq_len: int = 0
    max_num_tokens: int = 0
    prefix_cache: bool = True
    end_id: int | None = None
    pad_id: int | None = None
    trust_remote_code: bool = False
    stats_interval_s: float = 0.5

    @property
    def gpus(self) -> int:
        """GPUs one engine spans (tensor times pipeline parallel)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def read_options(config: BackendConfig) -> TensorRTLLMOptions:
    """Check ``config`` for the TensorRT-LLM backend and read its options.

    ``model_path`` may still be empty here (the engine refuses to start without
    one), so that a missing ``tensorrt_llm`` is reported first.
    """
    unknown = sorted(set(config.options) - set(OPTION_HELP))
    if unknown:
        raise ConfigError(
            f"unknown tensorrt-llm backend options {unknown}; known: {sorted(OPTION_HELP)}"
        )
    if config.dtype not in _DTYPES:
        raise ConfigError(
            f"invalid dtype {config.dtype!r} for the tensorrt-llm backend; use one of {_DTYPES}"
        )
    if config.device not in ("auto", "cuda"):
        raise ConfigError(
            f"the tensorrt-llm backend runs on NVIDIA GPUs: device must be auto or cuda, "
            f"got {config.device!r} (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if config.max_running < 1:
        raise ConfigError(f"max_running must be >= 1, got {config.max_running}")
    options = config.options
    model = config.model_path
    return TensorRTLLMOptions(
        model=model,
        model_name=_text(options, "model_name") or _model_name(model),
        tokenizer=_text(options, "tokenizer") or model,
        runtime=_choice(options, "runtime", RUNTIMES),
        dtype=config.dtype,
        max_running=config.max_running,
        tensor_parallel_size=_int(options, "tensor_parallel_size", minimum=1),
        pipeline_parallel_size=_int(options, "pipeline_parallel_size", minimum=1),
        free_gpu_memory_fraction=_fraction(options, "free_gpu_memory_fraction"),
        max_seq_len=_int(options, "max_seq_len", minimum=0),
        max_num_tokens=_int(options, "max_num_tokens", minimum=0),
        prefix_cache=_choice(options, "prefix_cache", _SWITCHES) == "on",
        end_id=_token_id(options, "end_id"),
        pad_id=_token_id(options, "pad_id"),
        trust_remote_code=_choice(options, "trust_remote_code", _SWITCHES) == "on",
        stats_interval_s=_int(options, "stats_interval_ms", minimum=10) / 1000,
    )


def _model_name(model: str) -> str:
    return PurePath(model.rstrip("/")).name if model else "tensorrt-llm"


def _text(options: Mapping[str, str], name: str) -> str:
    return options.get(name, "").strip() or OPTION_HELP[name][0]


def _choice(options: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = _text(options, name)
    if value not in choices:
        raise ConfigError(f"option {name} must be one of {choices}, got {value!r}")
    return value


def _int(options: Mapping[str, str], name: str, *, minimum: int) -> int:
    value = _text(options, name)
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ConfigError(f"option {name} must be an integer >= {minimum}, got {value!r}")
    return number


def _fraction(options: Mapping[str, str], name: str) -> float:
    value = _text(options, name)
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0.0 < number <= 1.0:
        raise ConfigError(f"option {name} must be a number in (0, 1], got {value!r}")
    return number


def _token_id(options: Mapping[str, str], name: str) -> int | None:
    if not _text(options, name):
        return None
    return _int(options, name, minimum=0)
