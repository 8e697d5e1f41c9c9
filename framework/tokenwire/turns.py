"""One chat turn, shared by ``Complete`` and ``Converse``: validate, store, stream.

A turn is validated in full before anything is stored or generated; the user's
message is committed before generation starts; the assistant's message is
written when the turn ends, complete or (cancelled, failed) with exactly the
text the client was sent.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from tokenwire.aio import closing, finish_shielded
from tokenwire.backend import ChatMessage, FinishReason
from tokenwire.config import LimitsConfig
from tokenwire.context import current_call
from tokenwire.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from tokenwire.frontend import ChatModel, PreparedTurn, TextDelta, TurnParams
from tokenwire.hooks import OutputFilter, TurnHook, TurnInfo, TurnOutcome
from tokenwire.logs import get_logger
from tokenwire.proto.v1 import chat_pb2
from tokenwire.stores.conversations import ConversationStore

__all__ = ["TurnRequest", "TurnRunner", "TurnState", "validate_params"]

_log = get_logger("tokenwire.turns")
_FINISH = {
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: chat_pb2.FINISH_REASON_CANCELLED,
    FinishReason.CONTENT_FILTER: chat_pb2.FINISH_REASON_CONTENT_FILTER,
    FinishReason.ERROR: chat_pb2.FINISH_REASON_ERROR,
}
_TITLE_CHARS = 80

TurnRequest = chat_pb2.CompleteRequest | chat_pb2.StartTurn
Response = TypeVar("Response", chat_pb2.CompleteResponse, chat_pb2.ConverseResponse)


@dataclass(slots=True)
class TurnState:
    """What a running turn has done so far; read by the caller on cancel or failure."""

    received_at: float = field(default_factory=time.perf_counter)
    turn_id: str = field(default_factory=lambda: f"turn_{uuid.uuid4().hex}")
    conversation_id: str = ""
    message_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    sent: list[str] = field(default_factory=list)
    finished: bool = False
    final_sent: bool = False  # TurnFinished is on its way: the turn is over for the client
    reason: FinishReason = FinishReason.ERROR
    filter_category: str = ""

    def usage(self) -> chat_pb2.Usage:
        """Token accounting so far."""
        ttft = 0.0 if self.first_token_at is None else self.first_token_at - self.received_at
        return chat_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            time_to_first_token_ms=ttft * 1000,
        )

    def finished_event(self, reason: FinishReason) -> chat_pb2.TurnFinished:
        """The TurnFinished message for this turn."""
        return chat_pb2.TurnFinished(
            finish_reason=_FINISH[reason],
            usage=self.usage(),
            turn_id=self.turn_id,
            filter_category=self.filter_category,
        )


def validate_params(params: chat_pb2.SamplingParams, limits: LimitsConfig) -> TurnParams:
    """Check sampling parameters; raises InvalidArgumentError naming the field."""
    if not (math.isfinite(params.temperature) and 0.0 <= params.temperature <= 2.0):
        raise InvalidArgumentError(f"temperature must be in [0, 2], got {params.temperature}")
    if not (math.isfinite(params.top_p) and 0.0 <= params.top_p <= 1.0):
        raise InvalidArgumentError(f"top_p must be in [0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidArgumentError(f"top_k must be >= 0, got {params.top_k}")
    if params.max_tokens < 0:
        raise InvalidArgumentError(f"max_tokens must be >= 0, got {params.max_tokens}")
    if len(params.stop) > limits.max_stop_strings:
        raise InvalidArgumentError(
            f"at most {limits.max_stop_strings} stop strings are allowed, got {len(params.stop)}"
        )
    for stop in params.stop:
        if not stop or len(stop) > limits.max_stop_chars:
            raise InvalidArgumentError(
                f"each stop string must be 1 to {limits.max_stop_chars} characters, got {len(stop)}"
            )
    return TurnParams(
        temperature=params.temperature,
        top_p=params.top_p or 1.0,
        top_k=params.top_k,
        max_tokens=params.max_tokens,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
    )


class TurnRunner:
    """Runs turns against the served models and the conversation store."""

    def __init__(
        self, models: Mapping[str, ChatModel], store: ConversationStore, limits: LimitsConfig
    ) -> None:
        if not models:
            raise ValueError("at least one model is required")
        self._models = dict(models)
        self._default = next(iter(self._models.values()))
        self._store = store
        self._limits = limits
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, limit_s: float) -> bool:
        """Wait until no turn is running (or saving its answer); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), limit_s)
        except TimeoutError:
            return False
        return True

    def _model(self, name: str) -> ChatModel:
        if not name:
            return self._default
        if len(name) > self._limits.max_model_name_chars:
            raise InvalidArgumentError(
                f"model name must be at most {self._limits.max_model_name_chars} characters"
            )
        model = self._models.get(name)
        if model is None:
            raise NotFoundError(f"model {name!r} is not served here; ListModels names the models")
        return model

    def _validate(self, request: TurnRequest) -> TurnParams:
        limits = self._limits
        if not request.message.strip():
            raise InvalidArgumentError("message must not be empty")
        if len(request.message) > limits.max_message_chars:
            raise InvalidArgumentError(
                f"message is {len(request.message)} characters; "
                f"the limit is {limits.max_message_chars}"
            )
        if len(request.idempotency_key) > limits.max_idempotency_key_chars:
            raise InvalidArgumentError(
                f"idempotency_key must be at most {limits.max_idempotency_key_chars} characters"
            )
        return validate_params(request.params, limits)

    async def _prepare(
        self, request: TurnRequest, model: ChatModel, params: TurnParams, owner: str
    ) -> PreparedTurn:
        messages: list[ChatMessage] = []
        if self._limits.system_prompt:
            messages.append(ChatMessage("system", self._limits.system_prompt))
        if request.conversation_id:
            await self._store.get_conversation(owner, request.conversation_id)
            history = await self._store.list_messages(
                owner, request.conversation_id, limit=self._limits.max_history_messages
            )
            messages.extend(ChatMessage(m.role, m.content) for m in history if m.content)
        messages.append(ChatMessage("user", request.message))
        return model.prepare(messages, params)

    async def run(
        self,
        request: TurnRequest,
        response: Callable[..., Response],
        state: TurnState,
    ) -> AsyncGenerator[Response, None]:
        """Stream one turn as ``response(started=...)``, ``response(delta=...)``, ... events.

        Errors before TurnStarted leave nothing stored. Closing the iterator (cancel)
        leaves an incomplete assistant message holding exactly the text sent.
        """
        self._active += 1
        self._idle.clear()
        try:
            params = self._validate(request)
            model = self._model(request.model)
            report = model.load()
            if report.running + report.queued >= model.backend.capabilities.max_batch:
                raise ResourceExhaustedError(
                    f"model {model.name!r} is at capacity ({report.running} answers running)",
                    retry_after_s=1.0,
                )
            call = current_call()
            owner = call.principal.owner
            turn = await self._prepare(request, model, params, owner)
            state.prompt_tokens = turn.prompt_tokens
            info = TurnInfo(
                turn_id=state.turn_id,
                method=call.method,
                principal=call.principal,
                model=model.name,
                message=request.message,
                prompt_tokens=turn.prompt_tokens,
                max_tokens=turn.max_tokens,
            )
            admitted: list[TurnHook] = []
            outcome = TurnOutcome(FinishReason.ERROR, turn.prompt_tokens, 0)
            try:
                for hook in call.turn_hooks:
                    await hook.before_turn(info)
                    admitted.append(hook)
                filters = [f for h in admitted if (f := h.output_filter(info)) is not None]
                events = self._stream(request, response, state, model, turn, owner, filters)
                async with closing(events):
                    async for event in events:
                        yield event
                outcome = TurnOutcome(state.reason, state.prompt_tokens, state.completion_tokens)
            except (asyncio.CancelledError, GeneratorExit):
                outcome = TurnOutcome(
                    FinishReason.CANCELLED, state.prompt_tokens, state.completion_tokens
                )
                raise
            except Exception as exc:
                outcome = TurnOutcome(
                    FinishReason.ERROR, state.prompt_tokens, state.completion_tokens, exc
                )
                raise
            finally:
                # One shielded task for all hooks: a cancel must not skip any settlement.
                await finish_shielded(self._after_turn(admitted, info, outcome))
            # Last, after the hooks settled: a client that sees TurnFinished may start the
            # next turn at once and must find this one's quota already refunded.
            state.final_sent = True
            yield response(finished=state.finished_event(state.reason))
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _after_turn(
        self, admitted: list[TurnHook], info: TurnInfo, outcome: TurnOutcome
    ) -> None:
        for hook in reversed(admitted):
            try:
                await hook.after_turn(info, outcome)
            except Exception:
                _log.exception("turn hook failed after the turn", turn_id=info.turn_id)

    async def _stream(
        self,
        request: TurnRequest,
        response: Callable[..., Response],
        state: TurnState,
        model: ChatModel,
        turn: PreparedTurn,
        owner: str,
        filters: list[OutputFilter],
    ) -> AsyncGenerator[Response, None]:
        conversation_id = request.conversation_id
        if not conversation_id:
            title = " ".join(request.message.split())[:_TITLE_CHARS]
            conversation_id = (await self._store.create_conversation(owner, title=title)).id
        await self._store.add_message(
            owner, conversation_id, role="user", content=request.message, turn_id=state.turn_id
        )
        state.conversation_id = conversation_id
        state.message_id = f"msg_{uuid.uuid4().hex}"
        _log.info(
            "turn started",
            turn_id=state.turn_id,
            conversation_id=conversation_id,
            model=model.name,
            prompt_tokens=turn.prompt_tokens,
            max_tokens=turn.max_tokens,
        )
        yield response(
            started=chat_pb2.TurnStarted(
                turn_id=state.turn_id,
                conversation_id=conversation_id,
                message_id=state.message_id,
                model=model.name,
            )
        )
        held_tokens = 0
        try:
            events = model.stream(turn, state.turn_id)
            async with closing(events):
                async for event in events:
                    if isinstance(event, TextDelta):
                        text = event.text
                        state.completion_tokens += event.token_count
                        held_tokens += event.token_count  # a filter may hold the text back
                    else:
                        state.completion_tokens = event.completion_tokens
                        state.prompt_tokens = event.prompt_tokens or state.prompt_tokens
                        state.reason = event.finish_reason
                        state.finished = True
                        text = ""
                    ended = state.finished  # the engine's final event: flush every filter
                    for screen in filters:
                        result = await screen.feed(text)
                        text, category = result.text, result.flagged_category
                        if ended and category is None:
                            tail = await screen.flush()
                            text, category = text + tail.text, tail.flagged_category
                        if category is not None:
                            state.reason = FinishReason.CONTENT_FILTER
                            state.filter_category = category
                            state.finished = True
                            break
                    if text:
                        if state.first_token_at is None:
                            state.first_token_at = time.perf_counter()
                        state.sent.append(text)
                        yield response(delta=chat_pb2.Delta(text=text, token_count=held_tokens))
                        held_tokens = 0
                    if state.finished:
                        break
            if not state.finished:
                state.reason = FinishReason.ERROR
        finally:
            # Shielded: a second cancel must not lose what the user already saw, and the
            # turn counts as running (wait_idle) until the answer is stored.
            await finish_shielded(self._save_answer(owner, state))
        _log.info(
            "turn finished",
            turn_id=state.turn_id,
            finish_reason=state.reason.value,
            completion_tokens=state.completion_tokens,
            ttft_ms=round(state.usage().time_to_first_token_ms, 2),
        )

    async def _save_answer(self, owner: str, state: TurnState) -> None:
        complete = state.finished and state.reason in (FinishReason.STOP, FinishReason.LENGTH)
        try:
            await self._store.add_message(
                owner,
                state.conversation_id,
                role="assistant",
                content="".join(state.sent),
                turn_id=state.turn_id,
                message_id=state.message_id,
                complete=complete,
            )
        except Exception:
            _log.exception("storing the answer failed", turn_id=state.turn_id)
