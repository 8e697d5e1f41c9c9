"""Moderation, measured: what each moderator catches and misses, and what it costs a stream.

    python -m benchmarks.moderation                  # accuracy (dev and held-out) + latency
    python -m benchmarks.moderation --guard          # also the guard model (SmolLM2 stand-in)
    python -m benchmarks.moderation --quick          # fewer latency turns

**Accuracy.** The labelled set in ``benchmarks/moderation_data``: abusive requests
and answers in nine categories (plain, paraphrased, obfuscated) and benign hard
negatives that share their words. ``*_dev`` is what exemplars, rules and the
classifier were written or trained from; ``*_heldout`` was never used for any of
them, and is reported apart. Per moderator: recall per category, the
false-positive rate per look-alike category, and overall.

**Latency.** The same turns through a live server (a paced fake engine: a token
of about four characters every 10 ms, a three-sentence answer), moderation off
as the baseline, then each moderator on input and output, in one run: time to
first token and the gap between visible updates (p50, p99) at the client, and
the difference from the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import grpc

from benchmarks.loadgen import percentile
from tokenwire.config import LoggingConfig
from tokenwire.logs import configure_logging
from tokenwire.moderation import ModerationConfig, Moderator, Verdict, moderator_name
from tokenwire.moderation.policy import ModerationPolicy, build_moderators
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import FakeBackend, config_for_tests, running_server

DATA = Path(__file__).resolve().parent / "moderation_data"
# The default configuration and the alternatives, by their moderation.moderator value.
SETUPS = {
    "rules": ModerationConfig(moderator="rules"),
    "embedding": ModerationConfig(moderator="embedding"),
    "classifier": ModerationConfig(moderator="classifier"),
    "rules,classifier (default)": ModerationConfig(),
}
ANSWER = (
    "Paris is the capital of France. It sits on the Seine and is known for its museums. "
    "Many visitors start with the Louvre and a walk along the river."
)


@dataclass(frozen=True, slots=True)
class Item:
    """One labelled text."""

    text: str
    category: str  # an abuse category, or "safe"
    near: str  # benign items: the category it resembles
    kind: str  # request or answer
    style: str


def load(split: str) -> list[Item]:
    """The ``dev`` or ``heldout`` items, abusive and benign."""
    items = []
    for path in sorted(DATA.glob(f"*_{split}.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                raw = json.loads(line)
                items.append(
                    Item(
                        raw["text"],
                        raw["category"],
                        raw.get("near", ""),
                        raw.get("kind", "request"),
                        raw.get("style", "plain"),
                    )
                )
    return items


@dataclass
class Score:
    """Flag counts of one moderator on one split."""

    caught: dict[str, list[bool]]  # abuse category -> flagged per item
    false: dict[str, list[bool]]  # benign look-alike category -> flagged per item
    seconds: list[float]

    def recall(self, category: str | None = None) -> float:
        flags = self.caught[category] if category else list(chain(*self.caught.values()))
        return sum(flags) / max(len(flags), 1)

    def fpr(self, near: str | None = None) -> float:
        flags = self.false[near] if near else list(chain(*self.false.values()))
        return sum(flags) / max(len(flags), 1)

    def hard_fpr(self) -> float:
        """The false-positive rate on benign text that looks like a category."""
        flags = list(chain(*(v for near, v in self.false.items() if near != "none")))
        return sum(flags) / max(len(flags), 1)


async def score(moderators: Sequence[Moderator], items: Sequence[Item]) -> Score:
    """Check every item with ``moderators`` (any flag counts), as the input check does."""
    result = Score(defaultdict(list), defaultdict(list), [])
    for item in items:
        began = time.perf_counter()
        flagged = False
        for moderator in moderators:
            if (await moderator.check(item.text)).flagged:
                flagged = True
                break
        result.seconds.append(time.perf_counter() - began)
        if item.category == "safe":
            result.false[item.near or "none"].append(flagged)
        else:
            result.caught[item.category].append(flagged)
    return result


def _pct(value: float) -> str:
    return f"{value * 100:5.1f}%"


def report(name: str, split: str, scores: dict[str, Score]) -> None:
    """One table: recall per category, FPR per look-alike, overall, per moderator."""
    names = list(scores)
    categories = sorted({c for s in scores.values() for c in s.caught})
    nears = sorted({c for s in scores.values() for c in s.false})
    width = max(14, *(len(n) for n in names))
    print(f"\n## {name}: {split}")
    print(f"{'':26}" + "".join(f"{n:>{width}}" for n in names))
    for category in categories:
        count = len(next(iter(scores.values())).caught[category])
        cells = "".join(f"{_pct(s.recall(category)):>{width}}" for s in scores.values())
        print(f"{'recall ' + category:20}{count:>5} " + cells)
    for near in nears:
        count = len(next(iter(scores.values())).false[near])
        cells = "".join(f"{_pct(s.fpr(near)):>{width}}" for s in scores.values())
        print(f"{'FPR near ' + near:20}{count:>5} " + cells)
    print(f"{'RECALL (all)':26}" + "".join(f"{_pct(s.recall()):>{width}}" for s in scores.values()))
    print(f"{'FPR (all)':26}" + "".join(f"{_pct(s.fpr()):>{width}}" for s in scores.values()))
    cells = "".join(f"{_pct(s.hard_fpr()):>{width}}" for s in scores.values())
    print(f"{'FPR (look-alikes only)':26}" + cells)
    cells = "".join(
        f"{statistics.median(s.seconds) * 1000:>{width - 3}.2f} ms" for s in scores.values()
    )
    print(f"{'check p50':26}" + cells)


async def accuracy(setups: dict[str, list[Moderator]], splits: Sequence[str]) -> None:
    """Every setup on each split (held-out first)."""
    for split in splits:
        items = load(split)
        if not items:
            print(f"no {split} items in {DATA}", file=sys.stderr)
            continue
        scores = {name: await score(moderators, items) for name, moderators in setups.items()}
        report(f"{len(items)} items", split, scores)


@dataclass(frozen=True, slots=True)
class LatencySetup:
    """What one latency row runs: a configuration, or a moderator already started."""

    config: ModerationConfig | None  # None: moderation off
    moderator: Moderator | None = None  # given: the policy checks with it alone


@dataclass
class StreamTimes:
    """What the client saw of one setup's turns (seconds), and how many were stopped."""

    ttfts: list[float]
    gaps: list[float]
    refused: int = 0  # the input check refused the turn
    cut: int = 0  # the output check stopped the answer


async def stream_latency(setup: LatencySetup, turns: int) -> StreamTimes:
    """TTFT and inter-token gaps of ``turns`` answers through a live server."""
    # The fake engine's tokens are bytes: four of them every 10 ms is a real tokenizer's
    # ~4 characters a token at 100 tokens/s.
    backend = FakeBackend(reply=ANSWER, token_delay_s=0.0025, tokens_per_chunk=4)
    moderation = setup.config or ModerationConfig(enabled=False)
    lent = _Unowned(setup.moderator) if setup.moderator else None
    policies = [ModerationPolicy(moderation, moderator=lent)] if moderation.enabled else []
    times = StreamTimes([], [])
    async with running_server(backend, config_for_tests(), policies=policies) as running:
        for turn in range(turns + 2):  # two unmeasured turns first
            began = time.perf_counter()
            last = None
            request = chat_pb2.CompleteRequest(message=f"Tell me about Paris ({turn}).")
            try:
                async for event in running.chat.Complete(request):
                    if event.HasField("finished") and turn >= 2:
                        filtered = chat_pb2.FINISH_REASON_CONTENT_FILTER
                        times.cut += event.finished.finish_reason == filtered
                    if not event.HasField("delta"):
                        continue
                    now = time.perf_counter()
                    if turn >= 2:
                        if last is None:
                            times.ttfts.append(now - began)
                        else:
                            times.gaps.append(now - last)
                    last = now
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                times.refused += turn >= 2
    return times


class _Unowned:
    """A started moderator lent to one policy: the policy's start and close leave it be."""

    def __init__(self, moderator: Moderator) -> None:
        self.moderator = moderator
        self.name = moderator_name(moderator)
        self.granularity = getattr(moderator, "granularity", "window")

    async def check(self, text: str) -> Verdict:
        return await self.moderator.check(text)


async def latency(setups: dict[str, LatencySetup], turns: int) -> None:
    """Each setup's TTFT and inter-token p50/p99, and what it adds to moderation off."""
    print(f"\n## Stream latency: {turns} turns each, a fake engine at 10 ms a token")
    print(f"{'':28}{'TTFT p50':>11}{'p99':>10}{'+p50':>10}{'gap p50':>11}{'p99':>10}{'+p99':>10}")
    base: tuple[float, float] | None = None
    for name, setup in setups.items():
        times = await stream_latency(setup, turns)
        ttft50, ttft99 = _ms(times.ttfts, 50), _ms(times.ttfts, 99)
        gap50, gap99 = _ms(times.gaps, 50), _ms(times.gaps, 99)
        base = base or (ttft50, gap99)
        stopped = (
            f"  ({times.refused} refused, {times.cut} cut)" if times.refused + times.cut else ""
        )
        print(
            f"{name:28}{_cell(ttft50, width=11)}{_cell(ttft99)}{_cell(ttft50 - base[0], '+')}"
            f"{_cell(gap50, width=11)}{_cell(gap99)}{_cell(gap99 - base[1], '+')}{stopped}"
        )


def _ms(seconds: list[float], p: float) -> float:
    """The ``p`` percentile in milliseconds, NaN when nothing was measured."""
    return percentile(seconds, p) * 1e3


def _cell(ms: float, sign: str = "", width: int = 10) -> str:
    """Milliseconds right-aligned in ``width`` characters; "-" when not measured."""
    return f"{'-' if math.isnan(ms) else f'{ms:{sign}.1f}ms':>{width}}"


async def _guard_setups(started: list[Any]) -> tuple[Moderator, Moderator]:
    """The guard on the real SmolLM2 engine, and the classifier escalating to it."""
    from tokenwire.backend import BackendConfig
    from tokenwire.config import LimitsConfig
    from tokenwire.model.frontend import frontend_for
    from tokenwire.moderation.classifier import ClassifierModerator
    from tokenwire.moderation.combine import EscalatingModerator
    from tokenwire.moderation.guard import GuardModerator
    from tokenwire_torch import TorchEngine

    model = frontend_for(TorchEngine(BackendConfig(device="cpu", max_running=4)), LimitsConfig())
    guard = GuardModerator(model, owns_model=True)
    await guard.start()
    classifier = ClassifierModerator()
    await classifier.start()
    started += [guard, classifier]
    return guard, EscalatingModerator([classifier, guard])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer latency turns")
    parser.add_argument("--no-latency", action="store_true", help="accuracy only")
    parser.add_argument("--no-accuracy", action="store_true", help="latency only")
    parser.add_argument("--splits", default="heldout,dev", help="which parts of the set")
    parser.add_argument(
        "--guard",
        action="store_true",
        help="also the guard model (the shipped SmolLM2 as a stand-in), alone and escalated "
        "behind the classifier (accuracy only; slow: a model call per text)",
    )
    args = parser.parse_args(argv)
    configure_logging(LoggingConfig(level="error"))  # audit records would swamp the tables

    async def run() -> None:
        setups: dict[str, list[Moderator]] = {}
        started: list[Any] = []
        try:
            for name, config in SETUPS.items():
                moderators = build_moderators(config)
                for moderator in moderators:
                    start = getattr(moderator, "start", None)
                    if start is not None:
                        await start()
                    started.append(moderator)
                setups[name] = moderators
            if args.guard:
                guard, escalate = await _guard_setups(started)
                setups["guard (SmolLM2)"] = [guard]
                setups["escalate(classifier,guard)"] = [escalate]
            if not args.no_accuracy:
                await accuracy(setups, args.splits.split(","))
            if not args.no_latency:
                rows = {"moderation off": LatencySetup(None)}
                rows |= {name: LatencySetup(config) for name, config in SETUPS.items()}
                rows.pop("embedding")  # its latency is the classifier's: the same model
                if args.guard:  # the turn's engine stays the paced fake; the guard is real
                    given = ModerationConfig(moderator="rules")  # replaced by the moderator
                    for name in ("guard (SmolLM2)", "escalate(classifier,guard)"):
                        rows[name] = LatencySetup(given, setups[name][0])
                await latency(rows, (5 if args.guard else 10) if args.quick else 40)
        finally:
            for moderator in started:
                close = getattr(moderator, "close", None)
                if close is not None:
                    await close()
        print("\nmoderators:", ", ".join(moderator_name(m) for m in chain(*setups.values())))

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
