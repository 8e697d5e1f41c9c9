"""Tokenwire: a gRPC-native serving framework for chat language models.

from tokenwire import TokenwireServer, load_config
asyncio.run(TokenwireServer(load_config()).serve())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenwire.backend import (
    BackendConfig,
    Capabilities,
    ChatMessage,
    Chunk,
    Engine,
    FinishReason,
    GenerateRequest,
    LoadReport,
    SamplingParams,
    TextBackend,
    TextChunk,
    TextRequest,
    TokenizerSource,
    create_backend,
)

if TYPE_CHECKING:
    from tokenwire.config import Config, load_config
    from tokenwire.server import TokenwireServer

__all__ = [
    "BackendConfig",
    "Capabilities",
    "ChatMessage",
    "Chunk",
    "Config",
    "Engine",
    "FinishReason",
    "GenerateRequest",
    "LoadReport",
    "SamplingParams",
    "TextBackend",
    "TextChunk",
    "TextRequest",
    "TokenizerSource",
    "TokenwireServer",
    "create_backend",
    "load_config",
]

__version__ = "0.1.0"

_LAZY = {"Config": "tokenwire.config", "load_config": "tokenwire.config"}
_LAZY["TokenwireServer"] = "tokenwire.server"


def __getattr__(name: str) -> Any:
    # The server and its configuration import grpc; a backend that imports the
    # contract (tokenwire.backend, tokenwire.errors) must not pull them in.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
