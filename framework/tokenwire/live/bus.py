"""Live turn events: what a turn publishes, and the in-process bus that fans it out.

A turn publishes ``started``, one ``delta`` per message sent, then ``finished``
for its conversation; watchers of the conversation (other devices, a client
resuming a turn) follow it. :class:`MemoryLiveBus` serves one process;
:class:`~tokenwire.live.redis_bus.RedisLiveBus` every gateway sharing a Redis.

    bus = MemoryLiveBus()
    await bus.open()
    events = bus.follow("c-1")                     # events published from now on
    bus.publish("c-1", LiveEvent("delta", "t-1", text="Hel"))
    async for item in events:                      # LiveEvent, or Lagged when it fell behind
        ...
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

__all__ = ["Lagged", "LiveBus", "LiveEvent", "MemoryLiveBus", "decode_event", "encode_event"]


@dataclass(slots=True)  # not frozen: built once per message sent, and frozen costs 3x
class LiveEvent:
    """One step of a turn, as watchers see it; fields not of its ``kind`` stay at their defaults.

    ``kind`` is ``"started"`` (answer id, model, the user's message), ``"delta"`` (text,
    its token count and where it starts in the answer) or ``"finished"`` (why, and the
    turn's usage).

        LiveEvent("delta", "t-1", text="Hello", token_count=1)
    """

    kind: str
    turn_id: str
    # started
    answer_id: str = ""
    model: str = ""
    user_message_id: str = ""
    user_text: str = ""
    created_at: float = 0.0
    # delta
    text: str = ""
    token_count: int = 0
    # characters of the answer before this delta (in "finished": all of them), so a
    # follower sees a gap left by a dropped event as a jump
    offset: int = 0
    # finished
    finish_reason: str = ""
    filter_category: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Lagged:
    """The follower missed events (its buffer overflowed or was trimmed); newer ones follow.

    What was missed is in the store once the turn ends; a watcher can reload it:

        if isinstance(item, Lagged):
            ...  # reload the conversation from the store, then keep following
    """

    reason: str


_REQUIRED = ("kind", "turn_id")
_DEFAULTS: dict[str, object] = {
    f.name: "" if f.name in _REQUIRED else f.default for f in fields(LiveEvent)
}


def encode_event(event: LiveEvent) -> bytes:
    """The event as compact JSON holding only its non-default fields.

    >>> encode_event(LiveEvent("delta", "t-1", text="hi"))
    b'{"kind":"delta","turn_id":"t-1","text":"hi"}'
    """
    data = {
        name: value
        for name, default in _DEFAULTS.items()
        if (value := getattr(event, name)) != default or name in _REQUIRED
    }
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def decode_event(raw: bytes) -> LiveEvent:
    """The event :func:`encode_event` wrote; unknown fields are ignored.

    >>> decode_event(b'{"kind":"delta","turn_id":"t-1","text":"hi"}').text
    'hi'
    """
    data = json.loads(raw.decode("utf-8", "surrogatepass"))
    if not isinstance(data, dict):
        raise ValueError("a live event is a JSON object")
    values: dict[str, Any] = {}
    for name, value in data.items():
        default = _DEFAULTS.get(name)
        if default is None:
            continue
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        if type(value) is not type(default):
            raise ValueError(f"live event field {name!r} has the wrong type")
        values[name] = value
    return LiveEvent(**values)


class LiveBus(Protocol):
    """Fans each conversation's live events out to its followers, in publish order.

    A follower is an async generator: ``aclose()`` it, or cancel a read, to stop it.

        await bus.open()
        bus.publish("c-1", LiveEvent("started", "t-1", answer_id="m-2"))
        async for item in bus.follow("c-1", from_start=True):
            ...
        await bus.close()
    """

    async def open(self) -> None:
        """Connect; raises :class:`~tokenwire.errors.UnavailableError` when that fails."""
        ...

    async def close(self) -> None:
        """Flush what was published, then end every follower's iterator."""
        ...

    def publish(self, conversation_id: str, event: LiveEvent) -> None:
        """Hand ``event`` to the conversation's followers; never blocks, never raises.

        Trouble with the bus is logged and the event dropped: the turn's hot path
        calls this once per message it sends.
        """
        ...

    def follow(
        self, conversation_id: str, *, from_start: bool = False
    ) -> AsyncIterator[LiveEvent | Lagged]:
        """The conversation's events published after this call (``from_start``: every
        event still buffered first), until the consumer stops or the bus closes.

        A consumer that reads slower than events arrive falls behind: it gets one
        :class:`Lagged`, then continues with the oldest events still buffered.
        """
        ...


class _Waiter:
    """One follower of a channel: woken when an event lands or the bus closes."""

    __slots__ = ("__weakref__", "wake")

    def __init__(self) -> None:
        self.wake = asyncio.Event()


class _Channel:
    """One conversation: its recent events, numbered, and who follows it."""

    __slots__ = ("events", "followers", "next_seq", "touched_at")

    def __init__(self, buffer_events: int, now: float) -> None:
        self.events: deque[LiveEvent] = deque(maxlen=buffer_events)
        self.next_seq = 0  # number of the next event; events[0] is next_seq - len(events)
        # Weak: a follow() never iterated must not pin the channel once it is garbage.
        self.followers: weakref.WeakSet[_Waiter] = weakref.WeakSet()
        self.touched_at = now

    @property
    def first_seq(self) -> int:
        return self.next_seq - len(self.events)


class MemoryLiveBus:
    """The live bus of one process: a ring buffer of events per conversation.

    Each conversation keeps its last ``buffer_events`` events; a follower that falls
    further behind than that gets :class:`Lagged`. A conversation nobody follows is
    forgotten ``retain_s`` after its last event (or after its last follower left),
    and at most ``max_conversations`` are kept, and at most ``max_events`` events in
    all (about 200 bytes each), the least recently used dropped first (a followed
    conversation is never dropped). ``clock`` is monotonic seconds.

        bus = MemoryLiveBus(buffer_events=4096)
        await bus.open()
    """

    def __init__(
        self,
        *,
        buffer_events: int = 4096,
        retain_s: float = 300.0,
        max_conversations: int = 10_000,
        max_events: int = 262_144,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if buffer_events < 1 or max_conversations < 1 or retain_s < 0:
            raise ValueError("buffer_events and max_conversations must be >= 1, retain_s >= 0")
        self._buffer_events = buffer_events
        self._retain_s = retain_s
        self._max_conversations = max_conversations
        self._max_events = max(max_events, buffer_events)
        self._events = 0  # buffered in all channels
        self._clock = clock
        # Least recently touched first: expiry and eviction look at the front only.
        self._channels: OrderedDict[str, _Channel] = OrderedDict()
        self._closed = False

    @property
    def conversations(self) -> int:
        """Conversations with a buffer (or a follower) right now."""
        return len(self._channels)

    async def open(self) -> None:
        """Nothing to connect; a closed bus opens again empty."""
        self._closed = False

    async def flush(self) -> None:
        """Nothing to write: followers see an event as soon as it is published."""

    async def close(self) -> None:
        """End every follower's iterator and forget every buffer."""
        self._closed = True
        for channel in self._channels.values():
            for waiter in list(channel.followers):
                waiter.wake.set()
        self._channels.clear()
        self._events = 0

    def publish(self, conversation_id: str, event: LiveEvent) -> None:
        """Append ``event`` to the conversation's buffer and wake its followers."""
        if self._closed:
            return
        now = self._clock()
        channel = self._channels.get(conversation_id)
        if channel is None:
            channel = self._add_channel(conversation_id, now)
        else:
            channel.touched_at = now
            self._channels.move_to_end(conversation_id)
        events = channel.events
        if len(events) < self._buffer_events:
            self._events += 1
        events.append(event)
        channel.next_seq += 1
        if self._events > self._max_events:
            self._evict(channel, now)
        if channel.followers:
            for waiter in channel.followers:
                waiter.wake.set()
        self._expire(now)

    def follow(
        self, conversation_id: str, *, from_start: bool = False
    ) -> AsyncGenerator[LiveEvent | Lagged, None]:
        """Follow the conversation from now on (``from_start``: from its oldest buffered event).

        The position is taken at the call, before the first read.
        """
        waiter = _Waiter()
        if self._closed:
            return self._iterate(conversation_id, None, waiter, 0)
        now = self._clock()
        channel = self._channels.get(conversation_id)
        if channel is None:
            channel = self._add_channel(conversation_id, now)
        channel.followers.add(waiter)
        self._expire(now)
        cursor = channel.first_seq if from_start else channel.next_seq
        return self._iterate(conversation_id, channel, waiter, cursor)

    async def _iterate(
        self, conversation_id: str, channel: _Channel | None, waiter: _Waiter, cursor: int
    ) -> AsyncGenerator[LiveEvent | Lagged, None]:
        if channel is None:
            return
        try:
            while not self._closed:
                first = channel.first_seq
                if cursor < first:
                    missed = first - cursor
                    cursor = first
                    yield Lagged(f"missed {missed} events: the follower read too slowly")
                    continue
                if cursor < channel.next_seq:
                    event = channel.events[cursor - first]
                    cursor += 1
                    yield event
                    continue
                waiter.wake.clear()
                await waiter.wake.wait()
        finally:
            self._leave(conversation_id, channel, waiter)

    def _leave(self, conversation_id: str, channel: _Channel, waiter: _Waiter) -> None:
        channel.followers.discard(waiter)
        if channel.followers or self._channels.get(conversation_id) is not channel:
            return
        if channel.events:
            channel.touched_at = self._clock()
            self._channels.move_to_end(conversation_id)
        else:
            self._drop(conversation_id)

    def _drop(self, conversation_id: str) -> None:
        channel = self._channels.pop(conversation_id)
        self._events -= len(channel.events)

    def _evict(self, keep: _Channel, now: float) -> None:
        """Drop the least recently used buffers nobody follows (never ``keep``) until
        within ``max_conversations`` and ``max_events``; followed ones move back."""
        for _ in range(len(self._channels)):
            if len(self._channels) <= self._max_conversations and self._events <= self._max_events:
                return
            oldest_id, oldest = next(iter(self._channels.items()))
            if oldest.followers or oldest is keep:
                oldest.touched_at = now
                self._channels.move_to_end(oldest_id)
            else:
                self._drop(oldest_id)

    def _add_channel(self, conversation_id: str, now: float) -> _Channel:
        channel = self._channels[conversation_id] = _Channel(self._buffer_events, now)
        self._evict(channel, now)
        return channel

    def _expire(self, now: float) -> None:
        deadline = now - self._retain_s
        for _ in range(len(self._channels)):
            oldest_id, oldest = next(iter(self._channels.items()))
            if oldest.touched_at > deadline:
                return
            if oldest.followers:
                oldest.touched_at = now
                self._channels.move_to_end(oldest_id)
            else:
                self._drop(oldest_id)
