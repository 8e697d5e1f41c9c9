"""Exact retries: a turn sent again with its idempotency key gets the first one back.

When :meth:`~tokenwire.stores.ConversationStore.begin_turn` finds the key, the
runner streams that earlier turn instead of generating again:

* **done**: TurnStarted, the stored answer as one Delta, TurnFinished as stored;
* **still running** (on this gateway or another): TurnStarted, the text its
  client was sent so far (the events still on the live bus), then the rest
  live, then TurnFinished. If the bus does not hold the turn's start (another
  process's memory bus, a restart) or the follower falls behind, the rest
  comes from the store once the turn has ended; the store is asked again every
  :data:`POLL_S` while nothing arrives, so a turn whose gateway died ends too.

The client sees exactly the text the first client was sent, once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, TypeVar

from tokenwire.backend import FinishReason
from tokenwire.errors import AbortedError, NotFoundError
from tokenwire.live.bus import Lagged, LiveBus, LiveEvent
from tokenwire.stores.conversations import BegunTurn, ConversationStore, TurnRecord
from tokenwire.streams import closing
from tokenwire.turns.events import Finished, Started, TurnEvents, TurnState, Usage

__all__ = ["POLL_S", "replay_turn"]

POLL_S: Final = 1.0
"""How often an attached retry asks the store whether the turn ended, when the bus is quiet."""

Out = TypeVar("Out")


async def replay_turn(
    store: ConversationStore,
    live: LiveBus | None,
    owner: str,
    begun: BegunTurn,
    events: TurnEvents[Out],
    state: TurnState,
) -> AsyncGenerator[Out, None]:
    """Stream the earlier turn ``begun.turn`` as this call's answer (see the module doc)."""
    turn = begun.turn
    state.turn_id = turn.turn_id
    state.conversation_id = turn.conversation_id
    state.message_id = turn.answer_id
    yield events.started(Started(turn.turn_id, turn.conversation_id, turn.answer_id, turn.model))
    sent: list[str] = []
    counted = 0
    if turn.running and live is not None:
        ended: LiveEvent | None = None
        async with closing(_attach(store, live, owner, turn)) as attached:
            async for item in attached:
                if isinstance(item, TurnRecord):
                    turn = item  # ended; the rest comes from the store
                    break
                if item.kind == "delta":
                    sent.append(item.text)
                    counted += item.token_count
                    yield events.delta(item.text, item.token_count)
                else:
                    ended = item
                    break
        if ended is not None:
            state.final_sent = True
            yield events.finished(
                Finished(
                    turn.turn_id,
                    FinishReason(ended.finish_reason),
                    Usage(ended.prompt_tokens, ended.completion_tokens, 0.0),
                    ended.filter_category,
                )
            )
            return
    if turn.running:  # no bus to follow: wait for the store to see the end
        turn = await _wait_until_done(store, owner, turn.turn_id)
    so_far = "".join(sent)
    rest = turn.answer[len(so_far) :] if turn.answer.startswith(so_far) else ""
    if rest:
        yield events.delta(rest, max(0, turn.completion_tokens - counted))
    state.final_sent = True
    yield events.finished(
        Finished(
            turn.turn_id,
            FinishReason(turn.finish_reason or FinishReason.ERROR.value),
            Usage(turn.prompt_tokens, turn.completion_tokens, 0.0),
            turn.filter_category,
        )
    )


async def _attach(
    store: ConversationStore, live: LiveBus, owner: str, turn: TurnRecord
) -> AsyncIterator[LiveEvent | TurnRecord]:
    """The turn's deltas and its finished event from the bus, in order, from its start;
    or its done record from the store, as soon as streaming from the bus cannot be exact
    (start not buffered, events lagged) or the store says the turn ended."""
    exact = False
    offset = 0  # characters of the answer passed on
    step: asyncio.Future[LiveEvent | Lagged] | None = None
    async with closing(live.follow(turn.conversation_id, from_start=True)) as follower:
        try:
            while True:
                if step is None:
                    step = asyncio.ensure_future(anext(follower))
                done, _ = await asyncio.wait({step}, timeout=POLL_S)
                if not done:
                    record = await _get_turn(store, owner, turn.turn_id)
                    if not record.running:
                        yield record
                        return
                    continue
                item = step.result()  # StopAsyncIteration: the bus closed; the store decides
                step = None
                if isinstance(item, Lagged):
                    exact = False
                    continue
                if item.turn_id != turn.turn_id:
                    continue
                if item.kind == "started":
                    exact = True  # every delta from here on is on the bus, in order
                    offset = 0
                elif item.kind == "finished":
                    # The record is committed before "finished" is published.
                    complete = exact and item.offset == offset
                    yield item if complete else await _get_turn(store, owner, turn.turn_id)
                    return
                elif exact and item.offset == offset:
                    offset += len(item.text)
                    yield item
                else:  # a delta missing before this one (a bus that dropped it): not exact
                    exact = False
        except StopAsyncIteration:
            yield await _wait_until_done(store, owner, turn.turn_id)
        finally:
            if step is not None:  # a read in flight: stopped before the follower closes
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step


async def _wait_until_done(store: ConversationStore, owner: str, turn_id: str) -> TurnRecord:
    while True:
        record = await _get_turn(store, owner, turn_id)
        if not record.running:
            return record
        await asyncio.sleep(POLL_S)


async def _get_turn(store: ConversationStore, owner: str, turn_id: str) -> TurnRecord:
    try:
        return await store.get_turn(owner, turn_id)
    except NotFoundError:
        # Undone after the key was found: its client left while it was being stored.
        raise AbortedError(
            "the turn this idempotency key named was cancelled before it started; "
            "send the turn again"
        ) from None
