"""The router's policies over a simulated fleet, side by side in one run.

The real routing code (:class:`tokenwire.router.fleet.Fleet`) chooses; the fleet
around it is simulated in virtual time, so 64 workers and thousands of
conversations take seconds:

* workers of different speeds: each prefills one prompt at a time (its prefill
  speed, tokens/s) and decodes up to ``slots`` answers at once (its decode speed
  per answer); a request waits for a slot, then for the prefills queued before it;
* a prefix cache per worker: a conversation's earlier turns (up to the last
  answer) are cached on the worker that served its last turn, in an LRU of
  ``cache_conversations`` conversations; the shared system prompt is cached
  everywhere;
* multi-turn conversations arriving in bursts (a Poisson process whose rate
  switches between high and low), each turn after the user's think time;
* load reports reach the router every ``poll_ms``, as GetLoads would; what the
  router sent meanwhile it counts itself, as in production.

The arrival rate is ``--utilisation`` of the turns the fleet sustains (its prefill
or its decode slots, whichever runs out first) on average; bursts go above. Every
policy sees the same arrivals and fleet.

    PYTHONPATH=framework:backends python -m benchmarks.router
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from tokenwire.backend import LoadReport
from tokenwire.router.fleet import POLICY_NAMES, Fleet, TurnView, WorkerState

SYSTEM_TOKENS = 200


@dataclass
class SimWorker:
    prefill_tps: float
    decode_tps: float
    slots: int
    cache_conversations: int
    cache: OrderedDict[str, int] = field(default_factory=OrderedDict)
    waiting: deque[Request] = field(default_factory=deque)  # for a slot
    prefill_queue: deque[Request] = field(default_factory=deque)
    prefilling: Request | None = None
    running: int = 0  # slots taken (prefilling, queued for prefill, or decoding)

    def queued_tokens(self) -> int:
        pending = sum(r.uncached for r in self.prefill_queue) + sum(r.prompt for r in self.waiting)
        return pending + (self.prefilling.uncached if self.prefilling else 0)


@dataclass
class Request:
    conversation: str
    prompt: int
    answer: int
    arrived: float
    view: TurnView
    state: WorkerState
    uncached: int = 0
    first_token: float = 0.0
    last: bool = False  # the conversation's last turn


@dataclass
class Conversation:
    key: str
    turns_left: int
    history: int = SYSTEM_TOKENS


@dataclass
class Outcome:
    ttfts: list[float]
    tokens: int
    seconds: float
    decision_us: float


def build_fleet(n: int, rng: random.Random, cache_conversations: int) -> list[SimWorker]:
    kinds = [(3000.0, 30.0), (6000.0, 45.0), (12000.0, 60.0), (20000.0, 80.0)]  # GPU generations
    return [
        SimWorker(*kinds[i % len(kinds)], slots=16, cache_conversations=cache_conversations)
        for i in range(n)
    ]


def simulate(
    policy: str,
    *,
    workers: int,
    conversations: int,
    utilisation: float,
    poll_ms: float,
    seed: int,
) -> Outcome:
    rng = random.Random(seed)
    sims = build_fleet(workers, rng, cache_conversations=64)
    now = 0.0
    fleet = Fleet(policy, clock=lambda: now, rng=random.Random(seed + 1), max_queue_per_slot=4.0)
    states = [fleet.add(f"w{i}", sim) for i, sim in enumerate(sims)]
    for state, sim in zip(states, sims, strict=True):
        fleet.report(state, LoadReport(), sim.slots)

    # Workload: turns at `utilisation` of what the fleet sustains, whichever of its
    # prefill (new prompt tokens per turn, with perfect caching) or its decode slots
    # (answer tokens per turn at each worker's decode speed) runs out first.
    mean_user, mean_answer = math.exp(5.5 + 0.6**2 / 2), math.exp(4.8 + 0.5**2 / 2)
    mean_turns, think_s = 4, 4.0
    prefill_turns = sum(s.prefill_tps for s in sims) / mean_user
    slot_turns = sum(s.slots * s.decode_tps for s in sims) / mean_answer
    turn_rate = utilisation * min(prefill_turns, slot_turns)
    conversation_rate = turn_rate / mean_turns

    events: list[tuple[float, int, str, object]] = []
    order = 0

    def push(at: float, kind: str, item: object) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, item))

    # Bursty arrivals: the rate alternates between 1.5x and 0.5x every 2 s.
    t = 0.0
    for i in range(conversations):
        high = int(t / 2.0) % 2 == 0
        t += rng.expovariate(conversation_rate * (1.5 if high else 0.5))
        turns = max(1, min(10, round(rng.expovariate(1 / mean_turns))))
        push(t, "turn", Conversation(f"c{i}", turns))
    push(0.0, "poll", None)

    ttfts: list[float] = []
    tokens = 0
    decision_s = 0.0
    decisions = 0
    active = conversations

    def try_start(sim: SimWorker) -> None:
        while sim.waiting and sim.running < sim.slots:
            request = sim.waiting.popleft()
            sim.running += 1
            cached = min(sim.cache.get(request.conversation, 0), request.prompt - 1)
            request.uncached = request.prompt - max(cached, SYSTEM_TOKENS)
            sim.prefill_queue.append(request)
        if sim.prefilling is None and sim.prefill_queue:
            request = sim.prefill_queue.popleft()
            sim.prefilling = request
            push(now + request.uncached / sim.prefill_tps, "prefilled", (sim, request))

    while events and active:
        now, _, kind, item = heapq.heappop(events)
        if kind == "poll":
            for state, sim in zip(states, sims, strict=True):
                load = LoadReport(
                    running=min(sim.running, sim.slots),
                    queued=len(sim.waiting),
                    queued_tokens=sim.queued_tokens(),
                )
                fleet.report(state, load, sim.slots)
            push(now + poll_ms / 1000, "poll", None)
        elif kind == "turn":
            conv = item
            assert isinstance(conv, Conversation)
            user = max(20, int(rng.lognormvariate(5.5, 0.6)))
            answer = max(10, int(rng.lognormvariate(4.8, 0.5)))
            prompt = conv.history + user
            view = TurnView(prompt, conv.key, SYSTEM_TOKENS)
            started = time.perf_counter()
            chosen = fleet.choose(view)
            decision_s += time.perf_counter() - started
            decisions += 1
            if chosen is None:  # every worker full: the client retries shortly
                push(now + 0.5, "turn", conv)
                continue
            request = Request(conv.key, prompt, answer, now, view, chosen)
            fleet.sent(chosen, view)
            target = chosen.handle
            assert isinstance(target, SimWorker)
            target.waiting.append(request)
            conv.history = prompt + answer
            conv.turns_left -= 1
            request.last = conv.turns_left == 0
            try_start(target)
            if conv.turns_left > 0:
                push(now + rng.expovariate(1 / think_s) + 2.0, "later", conv)
        elif kind == "later":
            push(now, "turn", item)
        elif kind == "prefilled":
            sim, request = item  # type: ignore[misc]
            sim.prefilling = None
            request.first_token = now
            ttft = now - request.arrived
            ttfts.append(ttft)
            fleet.first_token(request.state, request.view, ttft)
            push(now + request.answer / sim.decode_tps, "done", (sim, request))
            try_start(sim)
        elif kind == "done":
            sim, request = item  # type: ignore[misc]
            sim.running -= 1
            tokens += request.answer
            sim.cache[request.conversation] = request.prompt + request.answer
            sim.cache.move_to_end(request.conversation)
            while len(sim.cache) > sim.cache_conversations:
                sim.cache.popitem(last=False)
            fleet.finished(
                request.state,
                request.view,
                got_first=True,
                duration_s=now - request.arrived,
                cached_tokens=request.prompt + request.answer,
            )
            try_start(sim)
            if request.last:
                active -= 1
    return Outcome(ttfts, tokens, now, decision_s / max(1, decisions) * 1e6)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=6000)
    parser.add_argument("--utilisation", type=float, default=0.8)
    parser.add_argument("--poll-ms", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    args = parser.parse_args()
    print(
        f"{args.workers} workers of 4 speeds, {args.conversations} conversations, "
        f"~{args.utilisation:.0%} utilisation, bursty arrivals, loads every "
        f"{args.poll_ms:.0f} ms"
    )
    header = ("TTFT p50", "TTFT p99", "tok/s", "decision", "p99 vs p2c")
    print(f"{'policy':16} " + " ".join(f"{h:>9}" for h in header))
    results = {}
    for policy in args.policies.split(","):
        results[policy] = simulate(
            policy,
            workers=args.workers,
            conversations=args.conversations,
            utilisation=args.utilisation,
            poll_ms=args.poll_ms,
            seed=args.seed,
        )
    base = results.get("power_of_two")
    for policy, out in results.items():
        p99 = percentile(out.ttfts, 0.99)
        versus = f"{p99 / percentile(base.ttfts, 0.99):.2f}x" if base else "-"
        print(
            f"{policy:16} {statistics.median(out.ttfts) * 1000:7.0f}ms {p99 * 1000:7.0f}ms "
            f"{out.tokens / out.seconds:9.0f} {out.decision_us:7.1f}us {versus:>10}"
        )
    print("TTFT in simulated time; decision: wall-clock microseconds per choice of this code.")


if __name__ == "__main__":
    main()
