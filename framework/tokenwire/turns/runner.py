"""One chat turn, shared by ``Complete`` and ``Converse``: validate, admit, store, stream, settle.

The order is the contract:

1. validate the request in full and reserve engine capacity, atomically (no
   await between the check and the reservation), so a burst never gets past
   the engine's ``max_batch`` and an admitted turn is never refused later;
2. build the prompt (history, template, context bounds) and run every
   policy's ``before_turn`` (credentials, quotas, input moderation);
3. only then store the user's message and send TurnStarted;
4. stream the answer through the policies' output filters; the assistant's
   message is written when the turn ends, complete or (cancelled, failed) with
   exactly the text the client was sent;
5. give back the capacity, settle every admitted policy, then send TurnFinished.

A refusal at steps 1-2 leaves nothing stored and sends no TurnStarted.

The streaming loop is the hot path: it iterates the backend's own chunks (no
generator in between), decodes each synchronously, and merges chunks that are
already waiting into one message when the client reads slower than the engine
writes (at most ``coalesce_chunks``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import structlog

from tokenwire.backend import ChatMessage, FinishReason
from tokenwire.config import LimitsConfig
from tokenwire.context import CallState
from tokenwire.errors import (
    InternalError,
    NotFoundError,
    UnauthenticatedError,
)
from tokenwire.live.bus import LiveBus, LiveEvent
from tokenwire.logs import get_logger
from tokenwire.model.frontend import ChatModel, PreparedTurn
from tokenwire.stores.conversations import BegunTurn, ConversationStore, TurnEnd
from tokenwire.streams import Pending, finish_shielded, poll_next, start_now, wait_set
from tokenwire.tracing.spans import trace_id_of
from tokenwire.turns.admission import Capacity, validate_request
from tokenwire.turns.events import Started, TurnEvents, TurnRequest, TurnState, new_message_id
from tokenwire.turns.history import fit_history
from tokenwire.turns.policy import TurnInfo, TurnOutcome, TurnPolicy
from tokenwire.turns.replay import replay_turn

if TYPE_CHECKING:
    from tokenwire.tracing.spans import Tracing

__all__ = ["TurnRunner"]

_log = get_logger("tokenwire.turns")
_TITLE_CHARS = 80
Out = TypeVar("Out")


async def _finish(pending: Pending[BegunTurn]) -> BegunTurn:
    return await pending


def _end_span(span: Any, state: TurnState) -> None:
    span.set_attribute("turn.conversation_id", state.conversation_id)
    span.set_attribute("turn.finish_reason", state.reason.value)
    span.set_attribute("turn.prompt_tokens", state.prompt_tokens)
    span.set_attribute("turn.completion_tokens", state.completion_tokens)
    span.end()


def _outcome(
    state: TurnState,
    reason: FinishReason,
    prompt_tokens: int,
    error: BaseException | None = None,
) -> TurnOutcome:
    """How the turn ended, as the policies' after_turn sees it (timings included)."""
    first = state.first_token_at
    return TurnOutcome(
        reason,
        prompt_tokens,
        state.completion_tokens,
        error,
        time_to_first_token_s=None if first is None else first - state.received_at,
        streaming_s=0.0 if first is None else time.perf_counter() - first,
        filter_category=state.filter_category,
    )


class TurnRunner:
    """Runs turns against the served models, the conversation store and the policies.

    ``policies`` are every turn's policies, in order (see
    :mod:`tokenwire.turns.policy`); the server passes the ones
    :mod:`tokenwire.pipeline` declares.
    """

    def __init__(
        self,
        models: Mapping[str, ChatModel],
        store: ConversationStore,
        limits: LimitsConfig,
        policies: Sequence[TurnPolicy],
        *,
        coalesce_chunks: int = 16,
        coalesce_budget_us: float = 100.0,
        live: LiveBus | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        if not models:
            raise ValueError("at least one model is required")
        self._models = dict(models)
        self._default = next(iter(self._models.values()))
        self._capacity = {
            name: Capacity(name, model.backend.capabilities.max_batch)
            for name, model in self._models.items()
        }
        self._store = store
        self._limits = limits
        self._policies = tuple(policies)
        self._coalesce = max(1, coalesce_chunks)
        self._budget = max(0.0, coalesce_budget_us) / 1e6
        self._live = live
        self._tracing = tracing
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def capacity(self, model: str = "") -> Capacity:
        """The capacity counter of ``model`` (the default model when empty)."""
        return self._capacity[model or self._default.name]

    @property
    def active(self) -> int:
        """Turns running or saving their answer."""
        return self._active

    async def wait_idle(self, limit_s: float) -> bool:
        """Wait until no turn is running (or saving its answer); False on timeout."""
        return await wait_set(self._idle, limit_s)

    def _model(self, name: str) -> ChatModel:
        if not name:
            return self._default
        model = self._models.get(name)
        if model is None:
            raise NotFoundError(f"model {name!r} is not served here; ListModels names the models")
        return model

    async def _prepare(self, request: TurnRequest, model: ChatModel, owner: str) -> PreparedTurn:
        system = (
            [ChatMessage("system", self._limits.system_prompt)]
            if self._limits.system_prompt
            else []
        )
        history: list[ChatMessage] = []
        if request.conversation_id:  # one read: it checks the owner too
            stored = await self._store.list_messages(
                owner, request.conversation_id, limit=self._limits.max_history_messages
            )
            history = [ChatMessage(m.role, m.content) for m in stored if m.content]
        elif request.context:  # kept by the client (validated): its system messages stay
            system += [m for m in request.context if m.role == "system" and m.content]
            history = [m for m in request.context if m.role != "system" and m.content]
        user = ChatMessage("user", request.message)
        reserve = request.params.max_tokens or self._limits.default_max_tokens
        messages = fit_history(model, system, history, user, reserve)
        return model.prepare(messages, request.params)

    async def run(
        self,
        request: TurnRequest,
        call: CallState,
        events: TurnEvents[Out],
        state: TurnState | None = None,
    ) -> AsyncGenerator[Out, None]:
        """Stream one turn as ``events.started(...)``, ``events.delta(...)``, ... messages.

        Errors before TurnStarted leave nothing stored. Closing the iterator (cancel)
        leaves an incomplete assistant message holding exactly the text sent.
        """
        state = state if state is not None else TurnState()
        self._active += 1
        self._idle.clear()
        span = trace = None
        if self._tracing is not None:  # the turn's span: the root of its trace
            span = self._tracing.start("tokenwire.turn", attributes={"turn.id": state.turn_id})
            trace = self._tracing.inject(span)
            # The call's log lines from here carry it, as they carry its request id.
            structlog.contextvars.bind_contextvars(trace_id=trace_id_of(span))
        try:
            principal = call.principal
            if principal is None:  # fail closed: never serve a turn as nobody in particular
                raise UnauthenticatedError("the call was not authenticated")
            validate_request(request, self._limits)
            model = self._model(request.model)
            capacity = self._capacity[model.name]
            capacity.reserve()  # atomic with the checks above: no await in between
            reserved = True
            try:
                turn = await self._prepare(request, model, principal.owner)
                # An engine that knows it cannot start the turn now (every worker full)
                # refuses it here, before anything is stored or charged.
                admit = getattr(model.backend, "check_admission", None)
                if admit is not None:
                    admit()
                state.prompt_tokens = turn.prompt_tokens
                info = TurnInfo(
                    turn_id=state.turn_id,
                    call=call,
                    principal=principal,
                    model=model.name,
                    message=request.message,
                    prompt_tokens=turn.prompt_tokens,
                    max_tokens=turn.max_tokens,
                )
                admitted: list[TurnPolicy] = []
                outcome = TurnOutcome(FinishReason.ERROR, turn.prompt_tokens, 0)
                generating = False
                try:
                    for policy in self._policies:
                        await policy.before_turn(info)
                        admitted.append(policy)
                    begun = await self._begin(request, state, model, principal.owner)
                    if begun.replayed:  # a retry: the earlier turn, neither generated nor charged
                        outcome = TurnOutcome(FinishReason.CANCELLED, 0, 0)
                        capacity.release()  # a replay reads the store and the bus, not the engine
                        reserved = False
                        async for out in replay_turn(
                            self._store, self._live, principal.owner, begun, events, state
                        ):
                            yield out
                        return
                    chunks: AsyncIterator[object] | None = None
                    pending: Pending[object] | None = None
                    # The turn is stored as running from here: however it ends (a cancel
                    # at TurnStarted included), its answer is stored and the turn finished.
                    try:
                        filters = [f for p in admitted if (f := p.output_filter(info)) is not None]
                        yield events.started(
                            Started(
                                state.turn_id, state.conversation_id, state.message_id, model.name
                            )
                        )
                        generating = True  # from here the engine has the prompt
                        answer = model.answer(
                            turn, state.turn_id, state.conversation_id, trace or ()
                        )
                        chunks, decode, delta = answer.chunks, answer.decode, events.delta
                        screens = [
                            (f.feed_now if getattr(f, "synchronous", False) else None, f)  # type: ignore[attr-defined]
                            for f in filters
                        ]
                        limit, budget, sent, held = self._coalesce, self._budget, state.sent, 0
                        offset = 0  # characters sent so far
                        live, conversation_id, turn_id = (
                            self._live,
                            state.conversation_id,
                            state.turn_id,
                        )
                        # The hot path: one pass of this loop per message sent.
                        while True:
                            if pending is None:
                                chunk = await chunks.__anext__()
                            else:
                                step, pending = pending, None  # awaited once, even if cancelled
                                chunk = await step
                            text, count, end = decode(chunk)
                            failure: Exception | None = None
                            if end is None and limit > 1:
                                # Chunks already waiting go out with this one: a client that
                                # reads slower than the engine writes gets fewer, larger
                                # messages; one that keeps up gets every chunk on its own.
                                merged = 1
                                until = time.perf_counter() + budget
                                while end is None and merged < limit:
                                    if merged % 4 == 0 and time.perf_counter() > until:
                                        break  # a long step would delay every other stream
                                    try:
                                        ready, item = poll_next(chunks)
                                    except Exception as exc:  # send what came before it
                                        failure = exc
                                        break
                                    if not ready:
                                        pending = cast(Pending[object], item)
                                        break
                                    more, more_count, end = decode(item)
                                    text += more
                                    count += more_count
                                    merged += 1
                            held += count
                            if end is None:
                                state.completion_tokens += count
                            else:
                                state.completion_tokens = end.completion_tokens
                                state.prompt_tokens = end.prompt_tokens or state.prompt_tokens
                                state.reason = end.finish_reason
                                state.finished = True
                            # Text a screen lets through still passes every later one,
                            # even after an earlier screen ended the answer.
                            for now, screen in screens:
                                result = now(text) if now is not None else await screen.feed(text)
                                text, category = result.text, result.flagged_category
                                if state.finished and category is None:
                                    tail = await screen.flush()
                                    text, category = text + tail.text, tail.flagged_category
                                if category is not None and not state.filter_category:
                                    state.reason = FinishReason.CONTENT_FILTER
                                    state.filter_category = category
                                    state.finished = True
                            if text:
                                if state.first_token_at is None:
                                    state.first_token_at = time.perf_counter()
                                sent.append(text)
                                if live is not None:
                                    live.publish(
                                        conversation_id,
                                        LiveEvent(
                                            "delta",
                                            turn_id,
                                            text=text,
                                            token_count=held,
                                            offset=offset,
                                        ),
                                    )
                                offset += len(text)
                                yield delta(text, held)
                                held = 0
                            if state.finished:
                                break
                            if failure is not None:
                                raise failure
                    except StopAsyncIteration:
                        raise InternalError(
                            f"model {model.name!r} ended turn {state.turn_id} without a final chunk"
                        ) from None
                    except BaseException as exc:  # stored as how the answer ended
                        if not state.finished:
                            cancelled = not isinstance(exc, Exception)
                            state.reason = (
                                FinishReason.CANCELLED if cancelled else FinishReason.ERROR
                            )
                        raise
                    finally:
                        # Shielded: a second cancel must not lose what the user already saw,
                        # and the turn counts as running (wait_idle) until it is stored.
                        await finish_shielded(
                            self._end_answer(chunks, pending, principal.owner, state)
                        )
                        capacity.release()  # the engine stream is closed: the place is free
                        reserved = False
                    outcome = _outcome(state, state.reason, state.prompt_tokens)
                except BaseException as exc:  # GeneratorExit and CancelledError: cancelled
                    cancelled = not isinstance(exc, Exception)
                    outcome = _outcome(
                        state,
                        FinishReason.CANCELLED if cancelled else FinishReason.ERROR,
                        # A turn refused or cut before the engine got it used no tokens.
                        state.prompt_tokens if generating else 0,
                        None if cancelled else exc,
                    )
                    raise
                finally:
                    # One shielded task for all policies: a cancel must not skip a settlement.
                    await finish_shielded(self._after_turn(admitted, info, outcome))
            finally:
                if reserved:
                    capacity.release()
            _log.info(
                "turn finished",
                turn_id=state.turn_id,
                finish_reason=state.reason.value,
                completion_tokens=state.completion_tokens,
                ttft_ms=round(state.usage().time_to_first_token_ms, 2),
            )
            # Last, after the policies settled: a client that sees TurnFinished may start
            # the next turn at once and must find this one's quota refunded.
            state.final_sent = True
            yield events.finished(state.finished_event())
        finally:
            if span is not None:
                _end_span(span, state)
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _begin(
        self, request: TurnRequest, state: TurnState, model: ChatModel, owner: str
    ) -> BegunTurn:
        """Store the user's message (one transaction) and announce the turn to followers.

        A cancel that lands while the write is in flight waits for it and then
        undoes it, so no orphan conversation or message is left behind.
        """
        title = " ".join(request.message.split())[:_TITLE_CHARS]
        answer_id = new_message_id()
        ready, started = start_now(
            self._store.begin_turn(
                owner,
                request.conversation_id,
                title=title,
                content=request.message,
                turn_id=state.turn_id,
                answer_id=answer_id,
                model=model.name,
                idempotency_key=request.idempotency_key,
            )
        )
        if ready:  # committed inline, the usual case: no task, no loop turn
            begun = cast(BegunTurn, started)
        else:  # the write waits (a busy database): shield it from a cancel
            write = asyncio.ensure_future(_finish(cast(Pending[BegunTurn], started)))
            try:
                begun = await asyncio.shield(write)
            except asyncio.CancelledError:
                await finish_shielded(self._undo_begin(write, owner))
                raise
        if begun.replayed:
            return begun
        turn = begun.turn
        state.conversation_id = turn.conversation_id
        state.message_id = answer_id
        if self._live is not None:
            self._live.publish(
                turn.conversation_id,
                LiveEvent(
                    "started",
                    turn.turn_id,
                    answer_id=answer_id,
                    model=model.name,
                    user_message_id=begun.user_message.id,
                    user_text=request.message,
                    created_at=begun.user_message.created_at,
                ),
            )
        _log.info(
            "turn started",
            turn_id=state.turn_id,
            conversation_id=turn.conversation_id,
            model=model.name,
            prompt_tokens=state.prompt_tokens,
        )
        return begun

    async def _undo_begin(self, write: asyncio.Future[BegunTurn], owner: str) -> None:
        try:
            begun = await write
        except Exception:
            return  # nothing was stored
        if not begun.replayed:
            turn = begun.turn
            await self._store.discard_turn(owner, turn.conversation_id, turn.turn_id)

    async def _end_answer(
        self,
        chunks: AsyncIterator[object] | None,
        pending: Pending[object] | None,
        owner: str,
        state: TurnState,
    ) -> None:
        """Stop the engine's work for the answer, then store what the client was sent."""
        try:
            if pending is not None:
                await pending.abandon()
            aclose = getattr(chunks, "aclose", None) if chunks is not None else None
            if aclose is not None:
                await aclose()
        finally:
            await self._save_answer(owner, state)

    async def _after_turn(
        self, admitted: list[TurnPolicy], info: TurnInfo, outcome: TurnOutcome
    ) -> None:
        for policy in reversed(admitted):
            try:
                await policy.after_turn(info, outcome)
            except Exception:
                _log.exception("turn policy failed after the turn", turn_id=info.turn_id)

    async def _save_answer(self, owner: str, state: TurnState) -> None:
        complete = state.finished and state.reason in (FinishReason.STOP, FinishReason.LENGTH)
        answer = "".join(state.sent)
        end = TurnEnd(
            answer=answer,
            complete=complete,
            finish_reason=state.reason.value,
            filter_category=state.filter_category,
            prompt_tokens=state.prompt_tokens,
            completion_tokens=state.completion_tokens,
        )
        # Retried: until the turn is finished, its conversation takes no other turn.
        for attempt, delay_s in enumerate((0.05, 0.25, 1.0, 0.0)):
            try:
                await self._store.finish_turn(
                    owner, state.conversation_id, state.turn_id, state.message_id, end
                )
                break
            except Exception:
                if not delay_s:
                    _log.exception(
                        "storing the answer failed; the conversation stays busy until this "
                        "gateway stops",
                        turn_id=state.turn_id,
                        attempts=attempt + 1,
                    )
                    break
                _log.warning("storing the answer failed; retrying", turn_id=state.turn_id)
                await asyncio.sleep(delay_s)
        if self._live is not None:  # after the commit: a follower that sees it can read it back
            self._live.publish(
                state.conversation_id,
                LiveEvent(
                    "finished",
                    state.turn_id,
                    offset=len(answer),  # the whole answer: a follower missing a tail sees it
                    finish_reason=state.reason.value,
                    filter_category=state.filter_category,
                    prompt_tokens=state.prompt_tokens,
                    completion_tokens=state.completion_tokens,
                    ttft_ms=state.usage().time_to_first_token_ms,
                ),
            )
