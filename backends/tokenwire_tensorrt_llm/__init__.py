"""The TensorRT-LLM backend: ``tensorrt_llm.LLM`` in-process, on NVIDIA GPUs.

Registered under the ``tokenwire.backends`` entry point ``tensorrt-llm``.
Importing this package imports nothing of TensorRT-LLM, torch or CUDA;
``TensorRTLLMEngine.start()`` does, and without the package or a CUDA GPU it
raises a :class:`~tokenwire.errors.ConfigError` naming the extra
(``pip install 'tokenwire[tensorrt-llm]'``)::

    from tokenwire.backend import BackendConfig
    from tokenwire_tensorrt_llm import create_engine

    engine = create_engine(BackendConfig(
        name="tensorrt-llm",
        model_path="/models/Qwen2.5-7B-Instruct",
        options={"tensor_parallel_size": "2", "free_gpu_memory_fraction": "0.85"},
    ))
    await engine.start()

or ``tokenwire worker --backend tensorrt-llm`` with the same settings in
``[backend]``. :data:`OPTION_HELP` lists every option with its default.
"""

from __future__ import annotations

from tokenwire.backend import BackendConfig
from tokenwire_tensorrt_llm.api import EXTRA_HINT, LLMApi, load_llm_api
from tokenwire_tensorrt_llm.engine import TensorRTLLMEngine
from tokenwire_tensorrt_llm.options import OPTION_HELP, TensorRTLLMOptions, read_options

__all__ = [
    "EXTRA_HINT",
    "OPTION_HELP",
    "LLMApi",
    "TensorRTLLMEngine",
    "TensorRTLLMOptions",
    "create_engine",
    "load_llm_api",
    "read_options",
]


def create_engine(config: BackendConfig) -> TensorRTLLMEngine:
    """Build a TensorRT-LLM engine for ``config`` (cheap: the model loads in ``start()``).

    Raises :class:`tokenwire.errors.ConfigError` for an unknown or invalid
    option, a dtype or device the backend cannot use, or ``max_running < 1``.
    """
    return TensorRTLLMEngine(config)
