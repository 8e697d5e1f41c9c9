"""The backend plugin contract: engines speak tokens, text backends speak text.

A backend is a small class that never imports grpc and never sees the gateway's
server side. Two kinds exist:

* an :class:`Engine` works on token ids; the framework's model frontend
  (:mod:`tokenwire.model.frontend`) templates, tokenizes and detokenizes for it;
* a :class:`TextBackend` takes chat messages and yields text, for services that
  template and tokenize themselves.

Backends register a factory under the entry-point group ``tokenwire.backends``::

    [project.entry-points."tokenwire.backends"]
    mine = "my_package:create_engine"      # def create_engine(config: BackendConfig) -> Engine

The factory must be cheap: heavy work (loading weights) belongs in ``start()``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from tokenwire.errors import ConfigError

__all__ = [
    "BACKEND_ENTRY_POINT_GROUP",
    "Backend",
    "BackendConfig",
    "BackendFactory",
    "Capabilities",
    "ChatMessage",
    "Chunk",
    "Engine",
    "FinishReason",
    "GenerateRequest",
    "LoadReport",
    "SamplingParams",
    "TextBackend",
    "TextChunk",
    "TextRequest",
    "TokenizerSource",
    "available_backends",
    "common_prefix",
    "create_backend",
]

BACKEND_ENTRY_POINT_GROUP = "tokenwire.backends"


class FinishReason(enum.Enum):
    """Why generation for a request ended (mirrors ``tokenwire.v1.FinishReason``)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    CONTENT_FILTER = "content_filter"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation job for an engine: token ids in, token ids out.

    ``max_tokens`` is already bounded by the frontend so that prompt plus
    completion fits the engine's context; ``stop_token_ids`` end generation
    (the stop token itself is not returned). ``cache_scope`` bounds what an
    engine with a prefix cache may reuse: only keys computed for a request of
    the same scope (the gateway passes the conversation's id), so how fast a
    prompt starts never tells one conversation about another's text; empty: no
    reuse. The exception is the first ``shared_prefix_tokens`` of the prompt:
    the same for every conversation (the operator's system prompt and the chat
    template's own opening), their keys may be reused across scopes.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: frozenset[int] = frozenset()
    cache_scope: str = ""
    shared_prefix_tokens: int = 0
    # W3C trace context (``traceparent``) of the turn, as call metadata: engines that
    # call another service pass it on; others ignore it.
    trace_metadata: tuple[tuple[str, str], ...] = ()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (for prefix caches)."""
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += 1
    return shared


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens an engine has ready: every chunk but the last carries at least one.

    The last chunk sets ``finish_reason`` and the final token counts (it may also
    carry tokens). Engines yield all tokens that are ready as one chunk instead
    of one chunk per token, so a slow consumer sees coalesced output.
    """

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation, as the model's chat template sees it."""

    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class TextRequest:
    """One generation job for a text backend: messages in, text out."""

    request_id: str
    messages: Sequence[ChatMessage]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class TextChunk:
    """Text a text backend has ready; the last one sets ``finish_reason``."""

    text: str
    token_count: int = 0
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What the router needs to pick the least-loaded backend."""

    running: int = 0
    queued: int = 0
    queued_tokens: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    tokens_per_second: float = 0.0  # recent decode throughput


@dataclass(frozen=True, slots=True)
class TokenizerSource:
    """Where the frontend loads the tokenizer and chat template from.

    ``path`` is a local directory (a transformers checkpoint); ``gguf_file`` names a
    GGUF file inside it whose metadata carries the tokenizer and chat template.
    ``kind="bytes"`` needs no files: token ids 0..255 are UTF-8 bytes.
    """

    path: str = ""
    gguf_file: str | None = None
    kind: str = "transformers"  # or "bytes": each UTF-8 byte is one token (tests, byte engines)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; known after ``start()``."""

    model: str
    context_length: int
    max_batch: int = 1
    tokenizer: TokenizerSource | None = None


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """The model backend: which one, what model, where it runs."""

    name: str = field(default="torch", metadata={"help": "backend entry point to load, e.g. torch"})
    model_path: str = field(
        default="",
        metadata={"help": "model file or directory; empty: the backend's default model"},
    )
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda or cuda:N"}
    )
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    max_running: int = field(
        default=8,
        metadata={"help": "requests generating at once; more are refused as overloaded"},
    )
    options: Mapping[str, str] = field(
        default_factory=dict,
        metadata={"help": "backend-specific settings, key=value,key=value"},
    )


@runtime_checkable
class Engine(Protocol):
    """A token-level engine. Required: ``capabilities``, ``generate``, ``load``.

    Example::

        class EchoEngine:
            capabilities = Capabilities(model="echo", context_length=2048)
            async def start(self) -> None: ...
            async def close(self) -> None: ...
            def load(self) -> LoadReport: return LoadReport()
            async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
                yield Chunk(tuple(request.prompt_token_ids[:1]))
                yield Chunk((), FinishReason.STOP, len(request.prompt_token_ids), 1)

    Cancellation: when the consumer stops iterating (``aclose()``) or its task is
    cancelled, the engine stops work on that request within one decode step and
    frees its memory.
    """

    @property
    def capabilities(self) -> Capabilities: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]: ...

    def load(self) -> LoadReport: ...


@runtime_checkable
class TextBackend(Protocol):
    """A text-level backend: templating and tokenization happen behind it."""

    @property
    def capabilities(self) -> Capabilities: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate_text(self, request: TextRequest) -> AsyncIterator[TextChunk]: ...

    def load(self) -> LoadReport: ...


Backend = Engine | TextBackend
BackendFactory = Callable[[BackendConfig], Backend]


def available_backends() -> dict[str, str]:
    """Map each registered backend name to its entry point's target."""
    return {ep.name: ep.value for ep in entry_points(group=BACKEND_ENTRY_POINT_GROUP)}


def create_backend(config: BackendConfig) -> Backend:
    """Build the backend named by ``config.name`` through its entry point.

    Raises :class:`ConfigError` naming the registered backends, or the extra to
    install when the backend's heavy dependencies are missing.
    """
    found = [ep for ep in entry_points(group=BACKEND_ENTRY_POINT_GROUP) if ep.name == config.name]
    if not found:
        known = ", ".join(sorted(available_backends())) or "none"
        raise ConfigError(f"unknown backend {config.name!r}; registered backends: {known}")
    try:
        factory: BackendFactory = found[0].load()
    except ImportError as exc:
        raise ConfigError(
            f"backend {config.name!r} cannot be imported ({exc}); "
            f"install its extra: pip install 'tokenwire[{config.name}]'"
        ) from exc
    backend = factory(config)
    if not isinstance(backend, Engine | TextBackend):
        raise ConfigError(
            f"backend {config.name!r} built a {type(backend).__name__}, which has neither "
            "generate() (an Engine) nor generate_text() (a TextBackend)"
        )
    return backend
