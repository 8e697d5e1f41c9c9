"""The router's choice, on plain state: policies, affinity, ejection, saturation."""

from __future__ import annotations

import random

import pytest

from tokenwire.backend import LoadReport
from tokenwire.router.fleet import Fleet, TurnView, WorkerState


def fleet(policy: str = "ttft", workers: int = 3, **kwargs: object) -> tuple[Fleet, list[float]]:
    now = [0.0]
    f = Fleet(policy, clock=lambda: now[0], rng=random.Random(7), **kwargs)  # type: ignore[arg-type]
    for i in range(workers):
        f.report(f.add(f"w{i}"), LoadReport(), 8)
    return f, now


def test_ttft_prefers_the_worker_with_least_queued_prompt_tokens() -> None:
    """The default sends a turn where the queued prompt tokens ahead of it are fewest."""
    f, _ = fleet()
    f.report(f.workers["w0"], LoadReport(running=1, queued=1, queued_tokens=4000), 8)
    f.report(f.workers["w1"], LoadReport(running=1, queued=1, queued_tokens=100), 8)
    f.report(f.workers["w2"], LoadReport(running=1, queued=1, queued_tokens=900), 8)
    chosen = f.choose(TurnView(200))
    assert chosen is not None
    assert "w1" == chosen.key


def test_ttft_keeps_affinity_while_it_pays_and_yields_under_load() -> None:
    """A conversation's next turn goes back to the worker holding its prefix while that
    worker is not much busier, and elsewhere once its queue costs more than the prefix saves."""
    f, _ = fleet()
    turn = TurnView(1000, scope="conv-1")
    first = f.choose(turn)
    assert first is not None
    f.sent(first, turn)
    f.first_token(first, turn, 0.2)
    f.finished(first, turn, got_first=True, duration_s=1.0, cached_tokens=1100)
    second = TurnView(1200, scope="conv-1")
    assert first.key == f.choose(second).key  # type: ignore[union-attr]
    # Its worker now has a long prompt queue; the others are idle.
    f.report(first, LoadReport(running=4, queued=3, queued_tokens=20_000), 8)
    moved = f.choose(second)
    assert moved is not None
    assert first.key != moved.key


def test_least_requests_and_power_of_two_count_what_was_sent_since_the_report() -> None:
    """Between two load reports, turns sent meanwhile count, so a burst spreads out."""
    for policy in ("least_requests", "power_of_two"):
        f, _ = fleet(policy)
        picks = []
        for _ in range(30):
            w = f.choose(TurnView(10))
            assert w is not None
            f.sent(w, TurnView(10))
            picks.append(w.key)
        counts = sorted(picks.count(k) for k in f.workers)
        assert counts[-1] - counts[0] <= (0 if policy == "least_requests" else 6), policy


def test_round_robin_cycles_through_workers() -> None:
    """Round-robin takes every worker in turn."""
    f, _ = fleet("round_robin")
    keys = [f.choose(TurnView(10)).key for _ in range(6)]  # type: ignore[union-attr]
    assert {"w0", "w1", "w2"} == set(keys[:3]) == set(keys[3:])


def test_failures_eject_a_worker_until_a_report_brings_it_back() -> None:
    """Failures in a row take a worker out of rotation; a later good report restores it."""
    f, now = fleet(eject_after_failures=2, eject_s=5.0, workers=2)
    w0 = f.workers["w0"]
    f.failed(w0)
    assert w0 in f.usable()
    f.failed(w0)
    assert w0 not in f.usable()
    assert all(f.choose(TurnView(10)).key == "w1" for _ in range(5))  # type: ignore[union-attr]
    now[0] = 6.0
    f.report(w0, LoadReport(), 8)
    assert w0 in f.usable()


def test_draining_workers_get_no_turns() -> None:
    """A draining worker is skipped; with every worker draining there is no choice."""
    f, _ = fleet(workers=2)
    f.workers["w0"].draining = True
    assert "w1" == f.choose(TurnView(10)).key  # type: ignore[union-attr]
    f.workers["w1"].draining = True
    assert f.choose(TurnView(10)) is None


def test_saturated_when_every_worker_is_full() -> None:
    """Saturation: every usable worker has its slots and its allowed queue full."""
    f, _ = fleet(workers=2, max_queue_per_slot=0.5)
    f.report(f.workers["w0"], LoadReport(running=8, queued=4), 8)
    assert not f.saturated()
    f.report(f.workers["w1"], LoadReport(running=8, queued=3), 8)
    assert not f.saturated()
    f.sent(f.workers["w1"], TurnView(10))
    assert f.saturated()
    assert f.choose(TurnView(10)) is None


def test_affinity_memory_is_bounded() -> None:
    """The router remembers at most affinity_conversations conversations."""
    f, _ = fleet(affinity_conversations=2)
    for scope in ("a", "b", "c"):
        turn = TurnView(10, scope=scope)
        w = f.choose(turn)
        assert w is not None
        f.sent(w, turn)
        f.finished(w, turn, got_first=True, duration_s=0.1, cached_tokens=20)
    assert f.affinity("a") is None
    assert f.affinity("c") is not None


def test_unknown_policy_is_refused() -> None:
    """A policy name that does not exist is a ValueError naming the known ones."""
    with pytest.raises(ValueError, match="round_robin"):
        Fleet("fastest")


def test_a_policy_of_ones_own_chooses_among_usable_workers() -> None:
    """A callable policy gets the usable workers and the turn, and its choice is taken."""
    seen: list[list[str]] = []

    def last(candidates: list[WorkerState], turn: TurnView) -> WorkerState:
        seen.append([w.key for w in candidates])
        return candidates[-1]

    f = Fleet(last)
    for key in ("a", "b", "c"):
        f.report(f.add(key), LoadReport(), 4)
    f.workers["c"].draining = True
    chosen = f.choose(TurnView(10))
    assert chosen is not None
    assert ("b", [["a", "b"]]) == (chosen.key, seen)
