"""The benchmarks run and count correctly (smoke tests; speed is measured by the benchmarks)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import pytest

from benchmarks.framework_overhead import QUICK, RowResult, format_report, measure_overhead
from benchmarks.interceptor_chain import QUICK as CHAIN_QUICK
from benchmarks.interceptor_chain import ChainRow, measure_chain
from benchmarks.interceptor_chain import format_report as format_chain_report
from benchmarks.loadgen import LoadResult, format_table, percentile, run_load
from benchmarks.measure import ArmResult, parse_counts, ratio, round_ratios
from benchmarks.servers import bench_backend, full_chain_config, full_chain_server
from tokenwire.config import Config, ServerConfig
from tokenwire.testing import FakeBackend, config_for_tests, running_server


def _one_delta_per_chunk() -> Config:
    """A test config whose server sends every engine chunk as its own Delta."""
    base = config_for_tests()
    return config_for_tests(server=dataclasses.replace(base.server, coalesce_chunks=1))


async def test_run_load_counts_every_token_of_every_turn() -> None:
    """2 clients x 2 turns of an endless reply stream exactly clients*turns*max_tokens tokens."""
    clients, turns, max_tokens = 2, 2, 6
    backend = FakeBackend(reply="abc", endless=True)
    async with running_server(backend, _one_delta_per_chunk()) as running:
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


async def test_paced_load_starts_turns_at_the_offered_rate() -> None:
    """At 20 turns/s, 2 clients x 3 turns of a fast engine take the 5 intervals of
    their schedule (0.25 s), not the few ms a closed loop would."""
    clients, turns, rate = 2, 3, 20.0
    async with running_server(FakeBackend(reply="abc", endless=True)) as running:
        result = await run_load(running.address, clients, turns, 4, "Hi", turns_per_s=rate)
    assert (clients * turns, {}) == (result.completed_turns, result.errors)
    assert result.elapsed_s >= (clients * turns - 1) / rate
    # n turns over n - 1 intervals: never faster than that.
    assert result.turns_per_s <= rate * clients * turns / (clients * turns - 1)
    with pytest.raises(ValueError, match="turns_per_s"):
        await run_load(running.address, clients, turns, 4, "Hi", turns_per_s=-1.0)


async def test_run_load_weighs_coalesced_deltas_by_their_tokens() -> None:
    """A Delta of k tokens adds k inter-token samples, each its gap divided by k."""
    backend = FakeBackend(reply="abcd", endless=True, tokens_per_chunk=4)
    async with running_server(backend, _one_delta_per_chunk()) as r:
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
    """The quickest overhead run streams every token of every row through both servers."""
    settings = dataclasses.replace(
        QUICK,
        concurrency=(2,),
        max_tokens=40,
        tokens_per_run=1,
        min_turns=1,
        rounds=1,
        coalesced_chunk=4,
        client_process=False,
    )
    report = await measure_overhead(settings)
    default = ServerConfig().coalesce_chunks
    assert [(2, 1, default), (2, 1, 1), (2, 4, default)] == [
        (row.clients, row.tokens_per_chunk, row.coalesce_chunks) for row in report.rows
    ]
    assert 0 == report.failed_turns
    for row in report.rows:
        assert [2 * 1 * 40] == [r.tokens for r in row.bare.runs]
        assert [2 * 1 * 40] == [r.tokens for r in row.tokenwire.runs]
        # The floor sends one message per token and nothing else.
        assert [2 * 1 * 40] == [r.messages for r in row.bare.runs]
        # Measured, so defined (NaN means nothing was); their arithmetic is tested by hand below.
        figures = (row.ratio, row.cpu_ratio, row.ttft_ratio, row.tokenwire.cpu_us_per_message)
        assert all(math.isfinite(figure) for figure in figures)
    merged, per_message, _ = (row.tokenwire.runs[0].messages for row in report.rows)
    assert merged < per_message
    # One paced row (the default-merging one), offered half the floor's saturated rate.
    assert [2] == [paced.clients for paced in report.paced]
    (paced,) = report.paced
    assert paced.turns_per_s == pytest.approx(0.5 * report.rows[0].bare.turns_per_s)
    assert [2 * paced.turns * 40] * 2 == [
        arm.runs[0].tokens for arm in (paced.bare, paced.tokenwire)
    ]
    assert math.isfinite(paced.ttft_ratio)
    assert "same offered load" in format_report(report)
    assert "QuotaInterceptor" in report.pipeline
    assert "ModerationPolicy" in report.pipeline
    assert "per-call info logging off" in format_report(report)


def _arm(*rounds: tuple[float, float, float, int]) -> ArmResult:
    """An arm of 100-token runs, each ``(elapsed s, TTFT s, CPU s, messages)``."""
    arm = ArmResult()
    for elapsed_s, ttft_s, cpu_s, messages in rounds:
        run = LoadResult(1, 1, 100, elapsed_s=elapsed_s, tokens=100, messages=messages)
        run.ttft_s.append(ttft_s)
        arm.add(run, cpu_s)
    return arm


def test_figures_are_medians_over_rounds_and_ratios_of_them() -> None:
    """Hand-made rounds give the medians, ratios and costs worked out by hand."""
    # 100 tokens in 1, 2, 4 s: 100, 50, 25 tokens/s; TTFT 2, 4, 3 ms; 10, 20, 30 us/token.
    bare = _arm((1.0, 0.002, 0.001, 100), (2.0, 0.004, 0.002, 100), (4.0, 0.003, 0.003, 100))
    # 100 tokens in 2.5, 2, 5 s: 40, 50, 20 tokens/s; TTFT 9 ms; 50 us/token, 20 us/message.
    served = _arm((2.5, 0.009, 0.005, 250), (2.0, 0.009, 0.005, 250), (5.0, 0.009, 0.005, 250))
    assert (50.0, 40.0) == pytest.approx((bare.tokens_per_s, served.tokens_per_s))
    assert (3.0, 9.0) == pytest.approx((bare.ttft_p50_ms, served.ttft_p50_ms))
    assert (20.0, 50.0, 20.0) == pytest.approx(
        (bare.cpu_us_per_token, served.cpu_us_per_token, served.cpu_us_per_message)
    )
    assert 0.8 == pytest.approx(ratio(served, bare))
    assert [0.4, 1.0, 0.8] == pytest.approx(round_ratios(served, bare))
    row = RowResult(1, 1, 1, 1, bare=bare, tokenwire=served)
    assert (0.8, 0.4, 3.0) == pytest.approx((row.ratio, row.cpu_ratio, row.ttft_ratio))
    chain = ChainRow(1, 1, arms={"none": bare, "chain": served})
    assert (0.8, 0.2, 0.6) == pytest.approx(
        (chain.ratio("chain"), chain.cost("chain"), chain.cpu_cost("chain"))
    )


def test_a_base_that_streamed_nothing_gives_no_ratio() -> None:
    """With no tokens/s to divide by, the ratio is NaN, not an error or zero."""
    idle = ArmResult()
    idle.add(LoadResult(1, 1, 100), 0.0)
    assert math.isnan(ratio(_arm((1.0, 0.001, 0.001, 100)), idle))


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
    assert "ErrorsInterceptor -> AuthInterceptor; per turn: none" == report.pipelines["none"]
    assert (
        "ErrorsInterceptor -> AuthInterceptor -> SuspensionInterceptor -> QuotaInterceptor; "
        "per turn: CredentialPolicy -> AbusePolicy -> QuotaPolicy -> UsagePolicy -> "
        "ModerationPolicy"
    ) == report.pipelines["chain"]
    assert 0 == report.failed_turns
    [row] = report.rows
    none, chain = row.arms["none"], row.arms["chain"]
    assert [2 * 1 * 8] == [r.tokens for r in none.runs]
    assert [2 * 1 * 8] == [r.tokens for r in chain.runs]
    # coalesce_chunks = 1: one Delta per token, plus TurnStarted and TurnFinished.
    assert [2 * 1 * (8 + 2)] == [r.messages for r in none.runs]
    assert all(math.isfinite(f) for f in (row.ratio("chain"), row.cpu_cost("chain")))
    assert "Target: the pipeline costs under 15%" in format_chain_report(report)


async def test_full_chain_server_refuses_a_pipeline_without_every_part(tmp_path: Path) -> None:
    """A config that turns moderation off is not the full chain: the benchmark stops."""
    config = full_chain_config(str(tmp_path))
    config = dataclasses.replace(
        config, moderation=dataclasses.replace(config.moderation, enabled=False)
    )
    with pytest.raises(RuntimeError, match="ModerationPolicy"):
        async with full_chain_server(bench_backend(1, 1), config):
            pass


def test_parse_counts_reads_a_list_of_positive_counts() -> None:
    """ "1,16,64" is three counts; zero or words are refused as argparse errors."""
    assert (1, 16, 64) == parse_counts("1,16,64")
    for text in ("0", "1,x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_counts(text)


def test_router_benchmark_runs_every_turn_through_the_real_router() -> None:
    """The simulated fleet serves every turn of every conversation, for each policy."""
    from benchmarks.router import simulate

    for policy in ("ttft", "power_of_two"):
        out = simulate(policy, workers=8, conversations=60, utilisation=0.8, poll_ms=50.0, seed=3)
        assert out.ttfts
        assert all(t > 0 for t in out.ttfts)
        assert out.tokens > 0
        assert out.seconds > 0
        assert 0 < out.decision_us


def test_gateway_hop_benchmark_counts_every_token_of_both_arms() -> None:
    """A tiny gateway-hop run: both arms stream every token of every turn."""
    import asyncio

    from benchmarks.gateway_hop import measure

    direct, gateway = asyncio.run(measure(streams=2, turns=2, tokens=4, token_ms=1.0, rounds=1))
    for arm in (direct, gateway):
        assert 1 == len(arm.rounds)
        assert 2 * 2 * 4 == arm.rounds[0].tokens
        assert 4 == len(arm.rounds[0].ttfts)


async def test_observability_benchmark_measures_every_arm() -> None:
    """A tiny run: off, metrics and metrics+tracing each stream every token of every turn."""
    from benchmarks.measure import RunSettings
    from benchmarks.observability import ARMS, format_report, measure_observability

    settings = RunSettings(
        concurrency=(2,), max_tokens=8, tokens_per_run=32, min_turns=2, rounds=1,
        client_process=False,
    )  # fmt: skip
    rows, seconds = await measure_observability(settings)
    [row] = rows
    assert set(ARMS) == set(row.arms)
    for arm in row.arms.values():
        assert 0 == arm.failed_turns
        assert 2 * row.turns * 8 == arm.runs[0].tokens
    assert "metrics+tracing" in format_report(rows, settings, seconds)


async def test_http_edge_benchmark_streams_every_token_of_both_arms() -> None:
    """A tiny run: gRPC and OpenAI-compatible HTTP each stream every token of every turn."""
    from benchmarks.http_edge import ARMS, format_report, measure_edge
    from benchmarks.measure import RunSettings

    settings = RunSettings(
        concurrency=(2,), max_tokens=8, tokens_per_run=32, min_turns=2, rounds=1,
        client_process=False,
    )  # fmt: skip
    rows, seconds = await measure_edge(settings)
    [(clients, arms)] = rows
    assert set(ARMS) == set(arms)
    for arm in arms.values():
        assert 0 == arm.failed_turns
        assert clients * settings.turns_for(clients) * 8 == arm.runs[0].tokens
    assert "+TTFT" in format_report(rows, settings, seconds)


def test_openai_loadgen_script_answers_help_and_bad_options_without_installing() -> None:
    """benchmarks/openai_loadgen.sh is valid bash, and --help and a bad option answer at once,
    before any install step (the test suite never installs AIPerf nor starts a gateway)."""
    import subprocess

    script = str(Path(__file__).resolve().parent.parent / "benchmarks" / "openai_loadgen.sh")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", script, *args], capture_output=True, text=True, timeout=30, check=False
        )

    subprocess.run(["bash", "-n", script], check=True, timeout=30)
    shown = run("--help")
    assert (0, "") == (shown.returncode, shown.stderr)
    for option in ("--concurrency", "--requests", "--isl", "--osl", "--rate", "--backend", "--set"):
        assert option in shown.stdout
    for bad in (["--backend", "gpt"], ["--concurrency", "0"], ["--rate", "fast"], ["--nope"]):
        refused = run(*bad)
        assert 2 == refused.returncode, bad
        assert refused.stderr.startswith("error: "), bad


def test_moderation_benchmark_reads_both_parts_of_its_labelled_set() -> None:
    """At least 300 abusive and as many benign items, in every category, on both splits."""
    from benchmarks.moderation import load

    dev, heldout = load("dev"), load("heldout")
    abusive = [item for item in dev + heldout if item.category != "safe"]
    assert len(abusive) >= 300
    assert len(dev + heldout) - len(abusive) >= len(abusive)
    assert {item.category for item in heldout} == {item.category for item in dev}
    assert not {item.text for item in dev} & {item.text for item in heldout}


async def test_moderation_benchmark_scores_and_times_a_moderator() -> None:
    """Recall and FPR count the moderator's flags; refused and cut turns are counted."""
    from benchmarks.moderation import Item, LatencySetup, score, stream_latency
    from tokenwire.moderation import ModerationConfig, Verdict

    class FlagsWord:
        def __init__(self, word: str) -> None:
            self.word = word

        async def check(self, text: str) -> Verdict:
            hit = self.word in text
            return Verdict(hit, "violence" if hit else "", 1.0 if hit else 0.0)

    items = [
        Item("bomb here", "violence", "", "request", "plain"),
        Item("a knife", "violence", "", "request", "plain"),
        Item("bomb calorimeter", "safe", "violence", "request", "plain"),
        Item("hello", "safe", "", "request", "plain"),
    ]
    scored = await score([FlagsWord("bomb")], items)
    assert (0.5, 0.5, 1.0) == (scored.recall("violence"), scored.fpr(), scored.hard_fpr())
    config = ModerationConfig(moderator="rules")
    refused = await stream_latency(LatencySetup(config, FlagsWord("Paris")), 2)
    cut = await stream_latency(LatencySetup(config, FlagsWord("Seine")), 2)
    assert (2, 0, []) == (refused.refused, refused.cut, refused.ttfts)
    assert (0, 2, 2) == (cut.refused, cut.cut, len(cut.ttfts))  # the first sentence shown


def test_forward_benchmark_times_every_cell_of_both_attention_arms() -> None:
    """Each arm times a decode step for every row count and context; with a bf16 cache
    the float32 arm is there beside it."""
    from benchmarks.torch_forward import format_report, measure_steps
    from tests.backends.conftest import tiny_llama
    from tokenwire_torch.llama import cpu_has_bf16

    report = measure_steps((1, 2), (4, 9), rounds=2, steps=1, model=tiny_llama(seed=3))
    arms = {"bfloat16", "float32"} if cpu_has_bf16() else {"float32"}
    assert set(report["ms_per_step"]) == arms
    for cells in report["ms_per_step"].values():
        assert set(cells) == {"1x4", "2x4", "1x9", "2x9"}
        assert all(ms > 0 for ms in cells.values())
    assert format_report(report).count("\n") == 5
