"""The model frontend: text in, text out, over any backend.

For an :class:`~tokenwire.backend.Engine` the frontend does, once for every
engine: the model's chat template, tokenization (so prompt sizes are exact),
bounds against the context length, incremental detokenization that never splits
a character, and stop strings (held back until they cannot start a stop string).
A :class:`~tokenwire.backend.TextBackend` is passed through.

    model = EngineFrontend(engine, limits)
    await model.start()
    turn = model.prepare([ChatMessage("user", "Hi")], TurnParams(max_tokens=32))
    async for event in model.stream(turn, request_id="r1"):
        ...  # TextDelta(text, token_count) ..., then TurnEnd(finish_reason, usage)

The turn runner uses :meth:`ChatModel.answer` instead: the backend's own chunk
stream and a synchronous decoder, so no generator sits between engine and client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tokenwire.backend import (
    Backend,
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
    common_prefix,
)
from tokenwire.config import LimitsConfig
from tokenwire.errors import ConfigError, InternalError, InvalidArgumentError
from tokenwire.model.tokenizers import Tokenizer, load_tokenizer
from tokenwire.streams import closing

__all__ = [
    "Answer",
    "ChatModel",
    "EngineFrontend",
    "PreparedTurn",
    "StopMatcher",
    "TextDelta",
    "TextFrontend",
    "TurnEnd",
    "TurnParams",
    "closing",
    "frontend_for",
]


@dataclass(frozen=True, slots=True)
class TurnParams:
    """Validated sampling parameters of one turn (``max_tokens == 0``: the default)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def sampling(self) -> SamplingParams:
        """The engine-level sampling parameters."""
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.seed)


@dataclass(frozen=True, slots=True)
class PreparedTurn:
    """A turn that passed every bound, ready to stream."""

    messages: tuple[ChatMessage, ...]
    params: TurnParams
    max_tokens: int  # resolved: never 0, fits the context
    prompt_tokens: int  # exact for engines; 0 when a text backend does not say
    prompt_token_ids: tuple[int, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New answer text and the completion tokens it covers."""

    text: str
    token_count: int


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """The end of an answer."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


Decoded = tuple[str, int, "TurnEnd | None"]
"""What one backend chunk decodes to: new text, the tokens it covers, the end (or None)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A turn's answer as the backend streams it, and how to decode each chunk.

    ``chunks`` is the backend's own iterator (close it to stop the work);
    ``decode`` turns one chunk into :data:`Decoded`. Text held back (a
    character's first bytes, a possible stop string's start) comes with a later
    chunk, together with the tokens it covers.
    """

    chunks: AsyncIterator[object]
    decode: Callable[[object], Decoded]


class ChatModel(Protocol):
    """What the chat service needs of a served model."""

    @property
    def name(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    @property
    def backend(self) -> Backend: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def load(self) -> LoadReport: ...

    def prepare(self, messages: Sequence[ChatMessage], params: TurnParams) -> PreparedTurn: ...

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens of ``messages`` as a prompt (template included); 0 when unknown."""
        ...

    def stream(self, turn: PreparedTurn, request_id: str) -> AsyncIterator[TextDelta | TurnEnd]: ...

    def answer(
        self,
        turn: PreparedTurn,
        request_id: str,
        cache_scope: str = "",
        trace_metadata: tuple[tuple[str, str], ...] = (),
    ) -> Answer: ...


async def _stream(answer: Answer, name: str, request_id: str) -> AsyncIterator[TextDelta | TurnEnd]:
    """The events of an answer, one per chunk that has text or ends it."""
    async with closing(answer.chunks):
        async for chunk in answer.chunks:
            text, count, end = answer.decode(chunk)
            if text:
                yield TextDelta(text, count)
            if end is not None:
                yield end
                return
    raise InternalError(f"backend {name!r} ended request {request_id} without a final chunk")


class StopMatcher:
    """Finds stop strings in streamed text, holding back what could start one.

    ``feed`` returns the text that is safe to show and whether a stop string was
    reached (the stop string and anything after it are dropped).
    """

    __slots__ = ("_held", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buffer[:cut], True
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:n]):
                    keep = n
                    break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Text still held back when the answer ends without a stop string."""
        held, self._held = self._held, ""
        return held


_MAX_HEADS = 16  # distinct system prompts whose template opening is kept


def _leading_system(messages: Sequence[ChatMessage]) -> int:
    count = 0
    while count < len(messages) and messages[count].role == "system":
        count += 1
    return count


def _resolve_max_tokens(params: TurnParams, prompt: int, context: int, default: int) -> int:
    if prompt >= context:
        raise InvalidArgumentError(
            f"the prompt is {prompt} tokens but the model's context holds {context} tokens "
            "(prompt plus answer); send a shorter message"
        )
    room = context - prompt
    if params.max_tokens == 0:
        return min(default, room)
    if params.max_tokens > room:
        raise InvalidArgumentError(
            f"max_tokens is {params.max_tokens} but only {room} tokens are left in the "
            f"model's {context}-token context after the {prompt}-token prompt"
        )
    return params.max_tokens


class EngineFrontend:
    """Templating, tokenization, detokenization and stop strings for a token engine."""

    def __init__(
        self, engine: Engine, limits: LimitsConfig, *, tokenizer: Tokenizer | None = None
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._tokenizer = tokenizer
        # leading system messages → the template's tokens up to the first user message
        self._heads: dict[tuple[ChatMessage, ...], tuple[int, ...]] = {}

    @property
    def backend(self) -> Backend:
        return self._engine

    @property
    def name(self) -> str:
        return self._engine.capabilities.model

    @property
    def context_length(self) -> int:
        return self._engine.capabilities.context_length

    @property
    def tokenizer(self) -> Tokenizer:
        """The loaded tokenizer (after :meth:`start`)."""
        if self._tokenizer is None:
            raise ConfigError("the frontend is not started")
        return self._tokenizer

    async def start(self) -> None:
        """Start the engine, then load the tokenizer its capabilities name."""
        await self._engine.start()
        if self._tokenizer is None:
            source = self._engine.capabilities.tokenizer
            if source is None:
                raise ConfigError(
                    f"engine {type(self._engine).__name__} names no tokenizer in its capabilities"
                )
            self._tokenizer = await asyncio.to_thread(load_tokenizer, source)

    async def close(self) -> None:
        await self._engine.close()

    def load(self) -> LoadReport:
        return self._engine.load()

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens of ``messages`` with the chat template applied."""
        return len(self.tokenizer.encode_chat(messages))

    def prepare(self, messages: Sequence[ChatMessage], params: TurnParams) -> PreparedTurn:
        """Apply the chat template and check the context; raises InvalidArgumentError."""
        ids = self.tokenizer.encode_chat(messages)
        max_tokens = _resolve_max_tokens(
            params, len(ids), self.context_length, self._limits.default_max_tokens
        )
        return PreparedTurn(tuple(messages), params, max_tokens, len(ids), tuple(ids))

    def stream(self, turn: PreparedTurn, request_id: str) -> AsyncIterator[TextDelta | TurnEnd]:
        """Stream the answer; closing this iterator stops the engine's work."""
        return _stream(self.answer(turn, request_id), self.name, request_id)

    def shared_prefix_tokens(self, turn: PreparedTurn) -> int:
        """How many leading prompt tokens every conversation with the same system
        messages has: those messages (the operator's system prompt: clients send no
        system messages) and the template's opening, up to the first user message's
        text. Their keys are safe to reuse across conversations."""
        system = tuple(turn.messages[: _leading_system(turn.messages)])
        head = self._heads.get(system)
        if head is None:
            one, two = (
                self.tokenizer.encode_chat([*system, ChatMessage("user", text)])
                for text in ("a", "b")
            )
            head = tuple(one[: common_prefix(one, two)])
            if len(self._heads) >= _MAX_HEADS:
                self._heads.clear()
            self._heads[system] = head
        return common_prefix(head, turn.prompt_token_ids)

    def answer(
        self,
        turn: PreparedTurn,
        request_id: str,
        cache_scope: str = "",
        trace_metadata: tuple[tuple[str, str], ...] = (),
    ) -> Answer:
        """The engine's chunks for ``turn`` and their decoder (detokenizer, stop strings);
        ``cache_scope`` is what the engine may share cached keys within (a conversation),
        ``trace_metadata`` the turn's trace context."""
        request = GenerateRequest(
            request_id=request_id,
            prompt_token_ids=turn.prompt_token_ids,
            max_tokens=turn.max_tokens,
            sampling=turn.params.sampling(),
            stop_token_ids=self.tokenizer.eos_token_ids,
            cache_scope=cache_scope,
            shared_prefix_tokens=self.shared_prefix_tokens(turn),
            trace_metadata=trace_metadata,
        )
        decoder = _EngineDecoder(self.tokenizer.detokenizer().step, turn)
        return Answer(self._engine.generate(request), decoder.decode)  # type: ignore[arg-type]


class _EngineDecoder:
    """Detokenizes one answer's chunks and cuts it at the first stop string."""

    __slots__ = ("_completion", "_prompt", "_step", "_stops", "_uncounted")

    def __init__(self, step: Callable[[int], str], turn: PreparedTurn) -> None:
        self._step = step
        self._stops = StopMatcher(turn.params.stop) if turn.params.stop else None
        self._prompt = turn.prompt_tokens
        self._completion = 0
        self._uncounted = 0  # tokens whose text is still held back

    def decode(self, chunk: Chunk) -> Decoded:
        ids = chunk.token_ids
        self._completion += len(ids)
        self._uncounted += len(ids)
        step = self._step
        text = step(ids[0]) if len(ids) == 1 else "".join([step(t) for t in ids])
        stopped = False
        if self._stops is not None:
            text, stopped = self._stops.feed(text)
        if stopped or chunk.finish_reason is not None:
            if not stopped and self._stops is not None:
                text += self._stops.flush()
            reason = FinishReason.STOP if stopped else chunk.finish_reason
            assert reason is not None
            completion = chunk.completion_tokens or self._completion
            return text, self._uncounted, TurnEnd(reason, self._prompt, completion)
        if not text:
            return "", 0, None
        count, self._uncounted = self._uncounted, 0
        return text, count, None


class TextFrontend:
    """Passes turns through to a text backend, which templates and tokenizes itself."""

    def __init__(self, backend: TextBackend, limits: LimitsConfig) -> None:
        self._backend = backend
        self._limits = limits

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def name(self) -> str:
        return self._backend.capabilities.model

    @property
    def context_length(self) -> int:
        return self._backend.capabilities.context_length

    async def start(self) -> None:
        await self._backend.start()

    async def close(self) -> None:
        await self._backend.close()

    def load(self) -> LoadReport:
        return self._backend.load()

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Unknown here (0): the backend templates and tokenizes, and bounds the prompt."""
        return 0

    def prepare(self, messages: Sequence[ChatMessage], params: TurnParams) -> PreparedTurn:
        # The prompt's size is unknown here; the backend bounds it and reports usage.
        max_tokens = params.max_tokens or min(self._limits.default_max_tokens, self.context_length)
        return PreparedTurn(tuple(messages), params, max_tokens, 0)

    def stream(self, turn: PreparedTurn, request_id: str) -> AsyncIterator[TextDelta | TurnEnd]:
        """Stream the answer; closing this iterator stops the backend's work."""
        return _stream(self.answer(turn, request_id), self.name, request_id)

    def answer(
        self,
        turn: PreparedTurn,
        request_id: str,
        cache_scope: str = "",
        trace_metadata: tuple[tuple[str, str], ...] = (),
    ) -> Answer:
        """The backend's text chunks for ``turn``, passed through (a text backend keeps
        its own caches: ``cache_scope`` is not used)."""
        request = TextRequest(
            request_id, turn.messages, turn.max_tokens, turn.params.sampling(), turn.params.stop
        )
        completion = 0

        def decode(chunk: TextChunk) -> Decoded:
            nonlocal completion
            completion += chunk.token_count
            if chunk.finish_reason is None:
                return chunk.text, chunk.token_count, None
            total = chunk.completion_tokens or completion
            end = TurnEnd(chunk.finish_reason, chunk.prompt_tokens, total)
            return chunk.text, chunk.token_count, end

        return Answer(self._backend.generate_text(request), decode)  # type: ignore[arg-type]


def frontend_for(backend: Backend, limits: LimitsConfig) -> ChatModel:
    """The frontend that fits a backend's kind."""
    if isinstance(backend, Engine):
        return EngineFrontend(backend, limits)
    return TextFrontend(backend, limits)
