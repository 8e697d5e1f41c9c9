"""Triton Inference Server as a Tokenwire text backend (extra ``triton``).

Point it at a Triton server hosting TensorRT-LLM's ``ensemble`` (or
``tensorrt_llm_bls``) model::

    tokenwire serve --set backend.name=triton \\
        --set backend.options=url=triton.internal:8001,model=ensemble

See :mod:`tokenwire_triton.options` for every option. tritonclient is imported
when the backend starts, so choosing it without the extra fails with the command
that installs it.
"""

from __future__ import annotations

from tokenwire.backend import BackendConfig
from tokenwire_triton.backend import TritonBackend
from tokenwire_triton.options import TritonOptions

__all__ = ["TritonBackend", "TritonOptions", "create_backend"]


def create_backend(config: BackendConfig) -> TritonBackend:
    """The entry point ``triton``: a TritonBackend from ``backend.options``."""
    return TritonBackend(TritonOptions.parse(config.options))
