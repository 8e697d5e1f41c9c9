"""``FakeBackend``: a zero-cost token engine with failure injection, for tests and benchmarks.

It speaks bytes (token ids 0..255 are UTF-8 bytes, see
:class:`tokenwire.model.tokenizers.ByteTokenizer`), so the real frontend, templates
and detokenizer run on top of it. It answers with ``reply`` (repeated while
``endless``) up to the first of the request's stop token ids, records every
request, and can fail or stall on demand.

    backend = FakeBackend(reply="Hello, world!", token_delay_s=0.01)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenwire.backend import (
    BackendConfig,
    Capabilities,
    Chunk,
    FinishReason,
    GenerateRequest,
    LoadReport,
    TokenizerSource,
)
from tokenwire.errors import InternalError, InvalidArgumentError, ResourceExhaustedError

__all__ = ["FakeBackend", "FakeRequestLog", "create_fake_backend"]


@dataclass(slots=True)
class FakeRequestLog:
    """What happened to one request."""

    request: GenerateRequest
    tokens_sent: int = 0
    finished: FinishReason | None = None
    closed: bool = False  # the consumer stopped iterating before the end


class FakeBackend:
    """An engine that streams a fixed reply, byte by byte.

    ``token_delay_s`` paces tokens (0: as fast as the consumer pulls, one chunk
    each; with a delay, tokens ready while the consumer was busy come as one
    chunk). ``fail_after`` raises InternalError after that many tokens.
    ``max_running`` bounds concurrent requests (more are refused as overloaded).
    """

    def __init__(
        self,
        reply: str = "Hello from the fake backend.",
        *,
        token_delay_s: float = 0.0,
        endless: bool = False,
        fail_after: int | None = None,
        tokens_per_chunk: int = 1,
        context_length: int = 4096,
        max_running: int = 64,
        model: str = "fake",
    ) -> None:
        self.reply = reply.encode()
        self.token_delay_s = token_delay_s
        self.endless = endless
        self.fail_after = fail_after
        self.tokens_per_chunk = tokens_per_chunk
        self.max_running = max_running
        self.requests: list[FakeRequestLog] = []
        self.running = 0
        self.steps_executed = 0
        self.started = False
        self.closed = False
        self._single_chunks: tuple[Chunk, ...] | None = None
        self._capabilities = Capabilities(
            model=model,
            context_length=context_length,
            max_batch=max_running,
            tokenizer=TokenizerSource(kind="bytes"),
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def _plain(self, request: GenerateRequest) -> bool:
        return (
            self.tokens_per_chunk == 1
            and not self.token_delay_s
            and self.fail_after is None
            and not request.stop_token_ids.intersection(self.reply)
        )

    def _singles(self) -> tuple[Chunk, ...]:
        if self._single_chunks is None or len(self._single_chunks) != len(self.reply):
            self._single_chunks = tuple(Chunk((token,)) for token in self.reply)
        return self._single_chunks

    def load(self) -> LoadReport:
        return LoadReport(
            running=self.running, kv_cache_usage=min(1.0, self.running / self.max_running)
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if not request.prompt_token_ids or request.max_tokens < 1:
            raise InvalidArgumentError("empty prompt or max_tokens < 1")
        if self.running >= self.max_running:
            raise ResourceExhaustedError("fake backend overloaded", retry_after_s=1.0)
        log = FakeRequestLog(request)
        self.requests.append(log)
        self.running += 1
        prompt = len(request.prompt_token_ids)
        stopped = False
        began = asyncio.get_running_loop().time()
        try:
            if self._plain(request):
                # The benchmarks' case, as cheap as it can be: one ready token per chunk,
                # the chunks built once.
                singles = self._singles()
                n = len(singles)
                count = request.max_tokens if self.endless else min(n, request.max_tokens)
                for i in range(count):
                    self.steps_executed += 1
                    log.tokens_sent += 1
                    yield singles[i % n]
            while True:
                n = len(self.reply)
                want = min(self.tokens_per_chunk, request.max_tokens - log.tokens_sent)
                if not self.endless:
                    want = min(want, n - log.tokens_sent)
                if want <= 0:
                    break
                if self.fail_after is not None and log.tokens_sent >= self.fail_after:
                    raise InternalError("injected backend failure")
                if self.token_delay_s:
                    # Paced by the clock, as a real engine steps whether or not anyone
                    # reads: tokens that came due while the consumer was busy come as
                    # one chunk.
                    loop = asyncio.get_running_loop()
                    due = began + (log.tokens_sent + want) * self.token_delay_s
                    if loop.time() < due:
                        await asyncio.sleep(due - loop.time())
                    ready = int((loop.time() - began) / self.token_delay_s) - log.tokens_sent
                    left = request.max_tokens - log.tokens_sent
                    if not self.endless:
                        left = min(left, n - log.tokens_sent)
                    want = max(want, min(ready, left))
                start = log.tokens_sent
                ids = tuple(self.reply[(start + i) % n] for i in range(want))
                stop_at = next(
                    (i for i, token in enumerate(ids) if token in request.stop_token_ids), None
                )
                if stop_at is not None:  # the stop token ends the answer and is not sent
                    self.steps_executed += stop_at + 1
                    log.tokens_sent += stop_at
                    if stop_at:
                        yield Chunk(ids[:stop_at])
                    stopped = True
                    break
                self.steps_executed += want
                log.tokens_sent += want
                yield Chunk(ids)
            reason = (
                FinishReason.STOP
                if stopped or log.tokens_sent < request.max_tokens
                else FinishReason.LENGTH
            )
            log.finished = reason
            yield Chunk((), reason, prompt, log.tokens_sent)
        finally:
            if log.finished is None:
                log.closed = True
            self.running -= 1


def create_fake_backend(config: BackendConfig) -> FakeBackend:
    """Entry point ``fake``: options ``reply``, ``token_delay_s``, ``endless``."""
    opts = config.options
    return FakeBackend(
        reply=opts.get("reply", "Hello from the fake backend."),
        token_delay_s=float(opts.get("token_delay_s", "0")),
        endless=opts.get("endless", "false").lower() in ("1", "true", "yes"),
        tokens_per_chunk=int(opts.get("tokens_per_chunk", "1")),
        max_running=config.max_running,
    )
