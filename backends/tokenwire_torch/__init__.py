"""The torch backend: SmolLM2 (or any GGUF / transformers causal LM) on CPU or CUDA.

Registered under the ``tokenwire.backends`` entry point ``torch``. Importing this
package imports neither torch nor transformers; ``TorchEngine.start()`` does::

    from tokenwire.backend import BackendConfig
    from tokenwire_torch import create_engine

    engine = create_engine(BackendConfig(device="cpu"))
    await engine.start()
"""

from __future__ import annotations

from tokenwire.backend import BackendConfig
from tokenwire_torch.engine import TorchEngine
from tokenwire_torch.source import ModelSource, default_model_file, resolve_model_source

__all__ = [
    "ModelSource",
    "TorchEngine",
    "create_engine",
    "default_model_file",
    "resolve_model_source",
]


def create_engine(config: BackendConfig) -> TorchEngine:
    """Build a torch engine for ``config`` (cheap: the model loads in ``start()``).

    Raises :class:`tokenwire.errors.ConfigError` for an unknown dtype, a
    ``max_running`` below 1 or an unknown entry in ``config.options``.
    """
    return TorchEngine(config)
