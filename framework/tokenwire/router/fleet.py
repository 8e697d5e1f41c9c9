"""What the router knows of its workers, and the policies that choose among them.

Plain state and arithmetic, no I/O: the gateway's :class:`~tokenwire.router.engine.RoutedEngine`
feeds it from live load reports and the turns it routes, and the router benchmark
drives the very same code over a simulated fleet.

Between two load reports a worker's numbers would go stale, and every turn of a
burst would pile onto the same "least loaded" worker; so the fleet counts its own
requests itself, exactly (in flight, and prompt tokens not yet prefilled), and
takes from the reports only what other gateways send.

Policies (``router.policy``):

* ``ttft`` (default): the least estimated time to first token for *this* turn:
  prompt tokens queued ahead of it plus its own uncached ones, at the prefill speed
  measured on that worker, plus the wait for a free slot when it has none. A
  worker that served the conversation's last turn holds its prefix, so its
  estimate counts only the new tokens: affinity holds while it pays and yields
  when that worker is busier than the saving.
* ``least_requests``, ``power_of_two`` (two at random, the one with fewer
  requests), ``round_robin``: for comparison;
* any :data:`Policy` callable of one's own (``RoutedEngine(config, policy=...)``).
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenwire.backend import LoadReport

__all__ = ["POLICY_NAMES", "Fleet", "Policy", "TurnView", "WorkerState"]

POLICY_NAMES = ("ttft", "round_robin", "least_requests", "power_of_two")

Policy = Callable[[list["WorkerState"], "TurnView"], "WorkerState"]
"""A routing policy of one's own: given the usable, unsaturated workers (never
empty) and the turn, the worker to send it to. It must take microseconds: it runs
on the event loop for every turn."""
_EWMA = 0.2  # weight of a new observation in the measured speeds
_DEFAULT_S_PER_TOKEN = 2e-4  # before a worker's first measured prefill
_DEFAULT_TURN_S = 2.0  # before a worker's first measured turn


@dataclass(slots=True)
class WorkerState:
    """One worker as the router sees it."""

    key: str
    load: LoadReport = field(default_factory=LoadReport)
    max_running: int = 0  # 0: unknown
    healthy: bool = True
    draining: bool = False
    excluded: str = ""  # why it never takes turns (it serves another model); empty: it may
    ejected_until: float = 0.0
    failures: int = 0  # consecutive
    in_flight: int = 0  # sent by this router, not yet finished
    others: int = 0  # requests of other routers (gateways), as of the last report
    pending_tokens: int = 0  # prompt tokens sent, first token not yet back
    s_per_token: float = _DEFAULT_S_PER_TOKEN  # measured prefill speed
    floor_s: float = 0.0  # measured time to a first token with nothing to prefill
    turn_s: float = _DEFAULT_TURN_S  # measured turn duration
    measured: bool = False  # a first token came back: the figures above are its own
    handle: object = None  # the transport's object (an engine client)

    def requests(self) -> int:
        """Running plus waiting: this router's own, exactly and now, and the others'
        as of the last report."""
        return self.others + self.in_flight

    def usable(self, now: float) -> bool:
        return (
            self.healthy and not self.draining and not self.excluded and now >= self.ejected_until
        )

    def saturated(self, max_queue_per_slot: float) -> bool:
        if self.max_running <= 0:
            return False
        return self.requests() >= self.max_running * (1 + max_queue_per_slot)


@dataclass(frozen=True, slots=True)
class TurnView:
    """What a policy may know of the turn it routes."""

    prompt_tokens: int
    scope: str = ""  # the conversation: its last worker holds its prefix
    shared_prefix_tokens: int = 0  # cached on every worker that served anyone


class Fleet:
    """The workers, their state, and the choice of one per turn."""

    def __init__(
        self,
        policy: str | Policy = "ttft",
        *,
        affinity_conversations: int = 100_000,
        max_queue_per_slot: float = 1.0,
        eject_after_failures: int = 3,
        eject_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(policy, str) and policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICY_NAMES)}")
        self.policy = policy
        self.workers: dict[str, WorkerState] = {}
        self._affinity: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._affinity_limit = affinity_conversations
        self._max_queue = max_queue_per_slot
        self._eject_after = eject_after_failures
        self._eject_s = eject_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._next = 0
        self._prior = WorkerState("")  # the fleet's figures, for workers not measured yet
        builtin: dict[str, Policy] = {
            "ttft": self._least_ttft,
            "round_robin": self._round_robin,
            "least_requests": self._least_requests,
            "power_of_two": self._power_of_two,
        }
        self._choose = builtin[policy] if isinstance(policy, str) else policy

    # -- membership and load -------------------------------------------------

    def add(self, key: str, handle: object = None) -> WorkerState:
        state = self.workers.get(key)
        if state is None:
            state = self.workers[key] = WorkerState(key, handle=handle)
        return state

    def remove(self, key: str) -> WorkerState | None:
        return self.workers.pop(key, None)

    def report(self, worker: WorkerState, load: LoadReport, max_running: int) -> None:
        """A fresh load report. Of the requests it counts, this router's own are the
        ones it has in flight; the rest are other gateways'. (This router's own count
        exactly from here on, whenever they start and end.)"""
        worker.load = load
        worker.max_running = max_running or worker.max_running
        worker.others = max(0, load.running + load.queued - worker.in_flight)
        worker.healthy = True
        worker.failures = 0

    def failed(self, worker: WorkerState) -> bool:
        """A call or a health check failed: eject after enough in a row. True when this
        failure took the worker out of rotation."""
        worker.failures += 1
        if worker.failures >= self._eject_after:
            ejecting = worker.healthy
            worker.healthy = False
            worker.ejected_until = self._clock() + self._eject_s
            return ejecting
        return False

    # -- choosing ------------------------------------------------------------

    def usable(self) -> list[WorkerState]:
        now = self._clock()
        return [w for w in self.workers.values() if w.usable(now)]

    def saturated(self) -> bool:
        """True when every usable worker is full (and there is at least one)."""
        usable = self.usable()
        return bool(usable) and all(w.saturated(self._max_queue) for w in usable)

    def choose(self, turn: TurnView, exclude: Sequence[str] = ()) -> WorkerState | None:
        """The worker for ``turn`` (None: no usable worker outside ``exclude``)."""
        now = self._clock()
        candidates = [
            w
            for w in self.workers.values()
            if w.usable(now) and w.key not in exclude and not w.saturated(self._max_queue)
        ]
        if not candidates:
            return None
        return self._choose(candidates, turn)

    def _round_robin(self, candidates: list[WorkerState], turn: TurnView) -> WorkerState:
        self._next += 1
        return candidates[self._next % len(candidates)]

    def _least_requests(self, candidates: list[WorkerState], turn: TurnView) -> WorkerState:
        least = min(w.requests() for w in candidates)
        return self._rng.choice([w for w in candidates if w.requests() == least])

    def _power_of_two(self, candidates: list[WorkerState], turn: TurnView) -> WorkerState:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if a.requests() <= b.requests() else b

    def _least_ttft(self, candidates: list[WorkerState], turn: TurnView) -> WorkerState:
        held = self._affinity.get(turn.scope) if turn.scope else None
        home = held[0] if held is not None else None
        home_cached = min(held[1], turn.prompt_tokens - 1) if held is not None else 0
        shared = turn.shared_prefix_tokens
        prompt = turn.prompt_tokens
        # Start at a random place: equal estimates do not all land on the first worker.
        start = self._rng.randrange(len(candidates))
        best = candidates[start]
        best_s = float("inf")
        prior = self._prior
        for w in candidates[start:] + candidates[:start]:
            cached = home_cached if w.key == home and home_cached > shared else shared
            queued = w.load.queued_tokens
            ahead = queued if queued > w.pending_tokens else w.pending_tokens
            # A worker not measured yet is taken to be like the ones that were.
            speed = w if w.measured else prior
            estimate = speed.floor_s + (ahead + prompt - cached) * speed.s_per_token
            slots = w.max_running
            if slots > 0:
                busy = w.requests() + 1 - slots
                if busy > 0:  # no free slot: wait for busy requests to finish, slots at a time
                    estimate += busy * w.turn_s / slots
            if estimate < best_s:
                best, best_s = w, estimate
        return best

    # -- what happened to a routed turn --------------------------------------

    def sent(self, worker: WorkerState, turn: TurnView) -> None:
        worker.in_flight += 1
        worker.pending_tokens += turn.prompt_tokens

    def first_token(self, worker: WorkerState, turn: TurnView, ttft_s: float) -> None:
        """The turn's first token came back after ``ttft_s``: learn the prefill speed."""
        worker.pending_tokens = max(0, worker.pending_tokens - turn.prompt_tokens)
        held = self._affinity.get(turn.scope) if turn.scope else None
        cached = turn.shared_prefix_tokens
        if held is not None and held[0] == worker.key:
            cached = max(cached, min(held[1], turn.prompt_tokens - 1))
        work = max(1, turn.prompt_tokens - cached + worker.load.queued_tokens)
        for speed in (worker, self._prior):
            # The floor follows the fastest first tokens (and drifts up slowly), so the
            # network and the engine's first step do not count as prefill time.
            first = not speed.measured
            speed.floor_s = (
                ttft_s if first else min(ttft_s, speed.floor_s + 0.05 * (ttft_s - speed.floor_s))
            )
            per_token = max(0.0, ttft_s - speed.floor_s) / work
            speed.s_per_token += _EWMA * (per_token - speed.s_per_token)
            speed.measured = True
        worker.failures = 0

    def finished(
        self,
        worker: WorkerState,
        turn: TurnView,
        *,
        got_first: bool,
        duration_s: float,
        cached_tokens: int,
    ) -> None:
        """The turn ended: free its place, remember where the conversation's prefix is."""
        worker.in_flight = max(0, worker.in_flight - 1)
        if not got_first:
            worker.pending_tokens = max(0, worker.pending_tokens - turn.prompt_tokens)
            return
        worker.turn_s += _EWMA * (duration_s - worker.turn_s)
        if turn.scope and self._affinity_limit:
            self._affinity[turn.scope] = (worker.key, cached_tokens)
            self._affinity.move_to_end(turn.scope)
            while len(self._affinity) > self._affinity_limit:
                self._affinity.popitem(last=False)

    def affinity(self, scope: str) -> str | None:
        """The worker that served the conversation's last turn, if remembered."""
        held = self._affinity.get(scope)
        return held[0] if held is not None else None
