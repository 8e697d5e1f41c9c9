"""The benchmarks run and count correctly (smoke tests; speed is measured by the benchmarks)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from benchmarks.framework_overhead import QUICK, format_report, measure_overhead
from benchmarks.interceptor_chain import QUICK as CHAIN_QUICK
from benchmarks.interceptor_chain import format_report as format_chain_report
from benchmarks.interceptor_chain import measure_chain
from benchmarks.loadgen import format_table, percentile, run_load
from tokenwire.testing import FakeBackend, running_server


async def test_run_load_counts_every_token_of_every_turn() -> None:
    """2 clients x 2 turns of an endless reply stream exactly clients*turns*max_tokens tokens."""
    clients, turns, max_tokens = 2, 2, 6
    async with running_server(FakeBackend(reply="abc", endless=True)) as running:
        result = await run_load(running.address, clients, turns, max_tokens, "Hi")
    assert clients * turns * max_tokens == result.tokens
    assert clients * turns == result.completed_turns
    assert [max_tokens] * (clients * turns) == result.tokens_per_turn
    assert {} == result.errors
    assert clients * turns == len(result.ttft_s)
    # One token per Delta, plus TurnStarted and TurnFinished per turn.
    assert clients * turns * (max_tokens + 2) == result.messages
    assert clients * turns * (max_tokens - 1) == len(result.itl_s)
    assert "errors" in format_table([result])


async def test_run_load_times_a_paced_backend() -> None:
    """At 50 ms a token, each TTFT and token lasts 50 ms or more, bounding the rate too."""
    delay_s, clients, turns, max_tokens = 0.05, 2, 2, 3
    backend = FakeBackend(reply="abc", endless=True, token_delay_s=delay_s)
    async with running_server(backend) as running:
        result = await run_load(running.address, clients, turns, max_tokens, "Hi")
    assert (clients * turns, clients * turns * max_tokens) == (
        result.completed_turns,
        result.tokens,
    )
    assert clients * turns == len(result.ttft_s)
    assert min(result.ttft_s) >= delay_s
    assert result.ttft_p50_ms >= delay_s * 1000
    # Each turn lasts its TTFT plus its token gaps: at least max_tokens delays.
    assert clients * turns * (max_tokens - 1) == len(result.itl_s)
    assert sum(result.ttft_s) + sum(result.itl_s) >= clients * turns * max_tokens * delay_s
    # Each client's turns run one after another.
    assert result.elapsed_s >= turns * max_tokens * delay_s
    assert result.tokens_per_s <= clients / delay_s


async def test_run_load_weighs_coalesced_deltas_by_their_tokens() -> None:
    """A Delta of k tokens adds k inter-token samples, each its gap divided by k."""
    async with running_server(FakeBackend(reply="abcd", endless=True, tokens_per_chunk=4)) as r:
        result = await run_load(r.address, clients=1, turns=2, max_tokens=8, prompt="Hi")
    assert 2 * 2 == result.deltas
    assert 2 * 8 == result.tokens
    # The second Delta of each turn carries 4 tokens: 4 samples each.
    assert 2 * 4 == len(result.itl_s)
    assert result.itl_s[0] == result.itl_s[3]


async def test_run_load_counts_failed_turns_by_status_code() -> None:
    """Turns the server refuses are counted under their status code, not raised."""
    async with running_server(FakeBackend(context_length=64)) as running:
        result = await run_load(running.address, clients=2, turns=2, max_tokens=1000)
    assert {"INVALID_ARGUMENT": 4} == result.errors
    assert 0 == result.completed_turns
    assert 0 == result.tokens
    assert math.isnan(result.ttft_p50_ms)


def test_percentile_is_nearest_rank() -> None:
    """p50 and p99 of 1..100 are 50 and 99; an empty sample has no percentile."""
    samples = [float(v) for v in range(100, 0, -1)]
    assert 50.0 == percentile(samples, 50)
    assert 99.0 == percentile(samples, 99)
    assert 100.0 == percentile(samples, 100)
    assert math.isnan(percentile([], 50))


async def test_overhead_measures_both_servers_and_their_ratio() -> None:
    """The quickest overhead run gives both servers a positive rate and their ratio."""
    settings = dataclasses.replace(
        QUICK,
        concurrency=(2,),
        max_tokens=8,
        tokens_per_run=1,
        min_turns=1,
        rounds=1,
        coalesced_chunk=4,
        client_process=False,
    )
    report = await measure_overhead(settings)
    assert [(2, 1), (2, 4)] == [(row.clients, row.tokens_per_chunk) for row in report.rows]
    for row in report.rows:
        assert 0 == row.failed_turns
        assert [2 * 1 * 8] == [r.tokens for r in row.bare.runs]
        assert [2 * 1 * 8] == [r.tokens for r in row.tokenwire.runs]
        assert row.bare.tokens_per_s > 0
        assert row.tokenwire.tokens_per_s > 0
        assert row.tokenwire.tokens_per_s / row.bare.tokens_per_s == pytest.approx(row.ratio)
        cpu = row.bare.cpu_us_per_token / row.tokenwire.cpu_us_per_token
        assert cpu == pytest.approx(row.cpu_ratio)
    assert "per-call info logging off" in format_report(report)


async def test_interceptor_chain_measures_both_arms_and_their_ratio() -> None:
    """The quickest chain run streams every token through both arms and reports their ratio."""
    settings = dataclasses.replace(
        CHAIN_QUICK,
        concurrency=(2,),
        max_tokens=8,
        tokens_per_run=1,
        min_turns=1,
        rounds=1,
        redis_url="",
        client_process=False,
    )
    report = await measure_chain(settings)
    assert ("none", "chain") == report.arms
    assert 0 == report.failed_turns
    [row] = report.rows
    none, chain = row.arms["none"], row.arms["chain"]
    assert [2 * 1 * 8] == [r.tokens for r in none.runs]
    assert [2 * 1 * 8] == [r.tokens for r in chain.runs]
    assert none.tokens_per_s > 0
    assert chain.tokens_per_s > 0
    assert chain.tokens_per_s / none.tokens_per_s == pytest.approx(row.ratio("chain"))
    assert 1 - row.ratio("chain") == pytest.approx(row.cost("chain"))
    assert "Target: the chain costs under 15%" in format_chain_report(report)
