"""Tokenwire: a gRPC-native serving framework for chat language models.

from tokenwire import TokenwireServer, load_config
asyncio.run(TokenwireServer(load_config()).serve())
"""

from __future__ import annotations

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
