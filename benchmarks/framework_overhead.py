"""Framework overhead: Tokenwire with its full pipeline against a bare grpc.aio floor, in one run.

Two kinds of server answer ``ChatService.Complete`` with turns of M tokens each:

* **tokenwire**: the full server (``running_server`` with the pipeline the
  server builds from its config, every part on: errors, authentication by API
  key, quotas and moderation of input and output; the model frontend and
  detokenizer; a real SQLite ``:memory:`` conversation store) over
  ``FakeBackend(endless=True)``, an engine that costs nothing and always has its
  next chunk ready, so what is measured is the framework. The engine yields one
  token per chunk; the server merges the chunks already waiting into one Delta
  (up to ``server.coalesce_chunks``, 16 by default) when the client reads slower
  than the engine writes. One row sets ``coalesce_chunks = 1``: one message per
  token, the per-message path's cost. Another has the engine yield 8 tokens a
  chunk, as a real engine does under load.
* **bare**: a plain ``grpc.aio`` server whose Complete yields M copies of one
  precomputed ``CompleteResponse(delta=Delta(text="x", token_count=1))``: the
  least any Python gRPC server can do for the same answer (the floor).

The same load generator (``benchmarks.loadgen.run_load``) drives both at each
concurrency, sending the same API key to both, in interleaved rounds (the order
flips every round); each figure is the median over rounds and the ratio is
tokenwire's tokens/s over the floor's. By default the client runs in a separate
process, so the servers keep this process's CPU to themselves and the CPU time
this process spends during a run is the server's: reported per token and per
message, it gives a second ratio that other load on the machine does not move.
``--same-process`` puts client and servers on one loop. Any failed turn, in the
warm-up or a measurement, fails the run (exit 1).

    python -m benchmarks.framework_overhead            # about 2.5 minutes on 2 cores
    python -m benchmarks.framework_overhead --quick    # about 30 seconds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from benchmarks import measure
from benchmarks.loadgen import LoadJob
from benchmarks.servers import (
    bare_server,
    bench_backend,
    describe_pipeline,
    full_chain_config,
    full_chain_server,
    issue_key,
)
from tokenwire.config import Config, LoggingConfig, ServerConfig
from tokenwire.logs import configure_logging
from tokenwire.testing import config_for_tests, running_server

__all__ = [
    "DEFAULT",
    "QUICK",
    "OverheadReport",
    "OverheadSettings",
    "RowResult",
    "format_report",
    "main",
    "measure_overhead",
]

DEFAULT_COALESCE = ServerConfig().coalesce_chunks


@dataclass(frozen=True, slots=True)
class OverheadSettings(measure.RunSettings):
    """What to measure and for how long."""

    concurrency: tuple[int, ...] = (1, 16, 64)  # streams of the default-coalescing rows
    per_message: bool = True  # a row at the most streams with coalesce_chunks = 1
    coalesced_chunk: int = 8  # engine tokens per chunk of the last row; 0: no such row
    full_chain: bool = True  # auth, quotas and moderation on; off: no authentication, nothing else
    paced_load: float = 0.5  # TTFT rows at this share of the floor's saturated turns/s; 0: none

    def rows(self) -> list[tuple[int, int, int]]:
        """``(streams, engine tokens per chunk, coalesce_chunks)`` of every row, in order."""
        most = max(self.concurrency)
        rows = [(clients, 1, DEFAULT_COALESCE) for clients in self.concurrency]
        if self.per_message:
            rows.append((most, 1, 1))
        if self.coalesced_chunk > 1:
            rows.append((most, self.coalesced_chunk, DEFAULT_COALESCE))
        return rows


DEFAULT = OverheadSettings()
QUICK = replace(DEFAULT, tokens_per_run=10_000, min_turns=2, rounds=2)


@dataclass(slots=True)
class RowResult:
    """One row: the same load against both servers, once per round."""

    clients: int
    tokens_per_chunk: int  # the engine's, in the tokenwire server
    coalesce_chunks: int  # the tokenwire server's server.coalesce_chunks
    turns: int  # per client and measurement
    bare: measure.ArmResult = field(default_factory=measure.ArmResult)
    tokenwire: measure.ArmResult = field(default_factory=measure.ArmResult)

    @property
    def ratio(self) -> float:
        """Tokenwire's median tokens/s over the bare floor's (1.0: no overhead)."""
        return measure.ratio(self.tokenwire, self.bare)

    @property
    def cpu_ratio(self) -> float:
        """The floor's CPU per token over tokenwire's: the throughput ratio a server
        would reach with a core to itself, and far less noisy than wall-clock rates."""
        tokenwire = self.tokenwire.cpu_us_per_token
        return self.bare.cpu_us_per_token / tokenwire if tokenwire > 0 else math.nan

    @property
    def ttft_ratio(self) -> float:
        """Tokenwire's median TTFT p50 over the floor's (1.0: no added latency)."""
        bare = self.bare.ttft_p50_ms
        return self.tokenwire.ttft_p50_ms / bare if bare > 0 else math.nan

    @property
    def round_ratios(self) -> list[float]:
        """Tokenwire over bare within each round: their spread shows the run's noise."""
        return measure.round_ratios(self.tokenwire, self.bare)

    @property
    def failed_turns(self) -> int:
        return self.bare.failed_turns + self.tokenwire.failed_turns

    def summary(self) -> dict[str, Any]:
        """The row's figures as JSON-ready values."""
        return {
            "streams": self.clients,
            "engine_tokens_per_chunk": self.tokens_per_chunk,
            "coalesce_chunks": self.coalesce_chunks,
            "turns_per_client": self.turns,
            "ratio": measure.finite(self.ratio, 4),
            "round_ratios": [measure.finite(r, 4) for r in self.round_ratios],
            "cpu_ratio": measure.finite(self.cpu_ratio, 4),
            "ttft_ratio": measure.finite(self.ttft_ratio, 4),
            "bare": self.bare.summary(),
            "tokenwire": self.tokenwire.summary(),
        }


@dataclass(slots=True)
class PacedRow:
    """TTFT of both servers at one offered load: the same turns/s sent to each.

    A saturated run measures the server's queue as much as its latency: a server
    that streams faster also starts more turns a second, and grpc.aio takes new
    calls one at a time, so new turns wait longer behind each other there. Paced
    at the same offered load, below the floor's capacity, the difference in TTFT
    is the latency the framework adds to a turn.
    """

    clients: int
    turns_per_s: float  # offered to both servers
    turns: int  # per client and measurement
    bare: measure.ArmResult = field(default_factory=measure.ArmResult)
    tokenwire: measure.ArmResult = field(default_factory=measure.ArmResult)

    @property
    def ttft_ratio(self) -> float:
        """Tokenwire's median TTFT p50 over the floor's at this load."""
        bare = self.bare.ttft_p50_ms
        return self.tokenwire.ttft_p50_ms / bare if bare > 0 else math.nan

    @property
    def failed_turns(self) -> int:
        return self.bare.failed_turns + self.tokenwire.failed_turns

    def summary(self) -> dict[str, Any]:
        """The row's figures as JSON-ready values."""
        return {
            "streams": self.clients,
            "offered_turns_per_s": round(self.turns_per_s, 1),
            "turns_per_client": self.turns,
            "ttft_ratio": measure.finite(self.ttft_ratio, 4),
            "bare": self.bare.summary(),
            "tokenwire": self.tokenwire.summary(),
        }


@dataclass(slots=True)
class OverheadReport:
    """Everything one run measured."""

    settings: OverheadSettings
    rows: list[RowResult]
    pipeline: str  # the tokenwire servers' chain and turn policies
    cpus: int
    elapsed_s: float
    warmup_errors: dict[str, int] = field(default_factory=dict)  # status code → failed turns
    paced: list[PacedRow] = field(default_factory=list)

    @property
    def failed_turns(self) -> int:
        """Failed turns in every measurement and in the warm-up."""
        measured = sum(row.failed_turns for row in self.rows)
        paced = sum(row.failed_turns for row in self.paced)
        return measured + paced + sum(self.warmup_errors.values())

    def summary(self) -> dict[str, Any]:
        """The report as a JSON-ready object."""
        return {
            "settings": asdict(self.settings),
            "pipeline": self.pipeline,
            "cpus": self.cpus,
            "elapsed_s": round(self.elapsed_s, 2),
            "warmup_errors": self.warmup_errors,
            "rows": [row.summary() for row in self.rows],
            "paced": [row.summary() for row in self.paced],
        }


async def measure_overhead(settings: OverheadSettings = DEFAULT) -> OverheadReport:
    """Run every row against both servers, interleaved over ``settings.rounds`` rounds."""
    settings.check()
    started = time.perf_counter()
    rows = [
        RowResult(clients, chunk, coalesce, settings.turns_for(clients))
        for clients, chunk, coalesce in settings.rows()
    ]
    streams = max(settings.concurrency)
    with tempfile.TemporaryDirectory(prefix="tokenwire-bench-") as data_dir:
        async with contextlib.AsyncExitStack() as stack:
            bare = await stack.enter_async_context(bare_server())
            # One tokenwire server per (engine chunk, coalescing), sharing one key store file.
            servers = {
                (chunk, coalesce): await stack.enter_async_context(
                    full_chain_server(
                        bench_backend(chunk, streams),
                        full_chain_config(data_dir, coalesce_chunks=coalesce),
                    )
                    if settings.full_chain
                    else running_server(bench_backend(chunk, streams), bare_chain_config(coalesce))
                )
                for chunk, coalesce in sorted(
                    {(r.tokens_per_chunk, r.coalesce_chunks) for r in rows}
                )
            }
            tokenwire = {key: running.address for key, running in servers.items()}
            pipeline = next(iter(servers.values())).server.pipeline
            api_key = await issue_key(pipeline) if settings.full_chain else ""
            client = await stack.enter_async_context(measure.load_client(settings.client_process))
            warm_tokens = min(16, settings.max_tokens)
            warmup_errors = await measure.warm_up(
                client,
                [
                    LoadJob(target, streams, 1, warm_tokens, api_key=api_key)
                    for target in (bare, *tokenwire.values())
                ],
            )
            await measure.run_rounds(
                client,
                [
                    [
                        (
                            arm,
                            LoadJob(
                                target, row.clients, row.turns, settings.max_tokens, api_key=api_key
                            ),
                        )
                        for arm, target in (
                            (row.bare, bare),
                            (row.tokenwire, tokenwire[row.tokens_per_chunk, row.coalesce_chunks]),
                        )
                    ]
                    for row in rows
                ],
                settings.rounds,
            )
            paced = _paced_rows(rows, settings)
            await measure.run_rounds(
                client,
                [
                    [
                        (
                            arm,
                            LoadJob(
                                target,
                                row.clients,
                                row.turns,
                                settings.max_tokens,
                                api_key=api_key,
                                turns_per_s=row.turns_per_s,
                            ),
                        )
                        for arm, target in (
                            (row.bare, bare),
                            (row.tokenwire, tokenwire[1, DEFAULT_COALESCE]),
                        )
                    ]
                    for row in paced
                ],
                settings.rounds,
            )
    return OverheadReport(
        settings,
        rows,
        describe_pipeline(pipeline),
        os.cpu_count() or 0,
        time.perf_counter() - started,
        warmup_errors,
        paced,
    )


def _paced_rows(rows: Sequence[RowResult], settings: OverheadSettings) -> list[PacedRow]:
    """One paced row per default row (one token a chunk, default merging), offered
    ``settings.paced_load`` times the floor's saturated turns/s at that concurrency;
    ``paced_load`` times the saturated run's turns, so it lasts about as long as the
    floor's saturated run."""
    if settings.paced_load <= 0:
        return []
    return [
        PacedRow(
            row.clients,
            settings.paced_load * row.bare.turns_per_s,
            max(settings.min_turns, math.ceil(row.turns * settings.paced_load)),
        )
        for row in rows
        if row.tokens_per_chunk == 1
        and row.coalesce_chunks == DEFAULT_COALESCE
        and row.bare.turns_per_s > 0
    ]


def format_report(report: OverheadReport) -> str:
    """The report as two tables with a short header saying how it was measured."""
    s = report.settings
    where = "its own process" if s.client_process else "the servers' event loop"
    cpu = "server CPU, us" if s.client_process else "CPU (server + client), us"
    parts = (
        "auth: API key, SQLite key store, cached; quotas: memory, requests/min, tokens/min, "
        "streams, none refused; moderation: rules, input + output"
        if s.full_chain
        else "auth: off; quotas: off; moderation: rules, input + output (the default config)"
    )
    lines = [
        "Tokenwire framework overhead: full server (FakeBackend, "
        f"{'full pipeline' if s.full_chain else 'no auth, no quotas'}, SQLite :memory:) "
        "vs a bare grpc.aio Complete (the floor)",
        f"pipeline: {report.pipeline}",
        parts,
        f"{report.cpus} CPUs; client in {where}; per-call info logging off (level=warning); "
        f"{s.max_tokens} tokens per turn; medians of {s.rounds} interleaved rounds; "
        f"{report.elapsed_s:.0f} s in all",
        "",
        f"{'chunk':>5} {'merge':>5} {'streams':>7} {'turns':>6} {'bare tok/s':>10} "
        f"{'tw tok/s':>9} {'tw/bare':>7} {'per round':>10} {'bare msg/s':>10} {'tw msg/s':>9} "
        f"{'tw tok/msg':>10}",
    ]
    for row in report.rows:
        t = row.tokenwire
        tokens_per_message = t.tokens_per_s / t.messages_per_s if t.messages_per_s else math.nan
        lines.append(
            f"{row.tokens_per_chunk:>5} {row.coalesce_chunks:>5} {row.clients:>7} "
            f"{row.clients * row.turns:>6} {row.bare.tokens_per_s:>10.0f} {t.tokens_per_s:>9.0f} "
            f"{measure.format_ratio(row.ratio):>7} {measure.format_spread(row.round_ratios):>10} "
            f"{row.bare.messages_per_s:>10.0f} {t.messages_per_s:>9.0f} {tokens_per_message:>10.1f}"
        )
    lines += [
        "",
        f"{'':>5} {'':>5} {'':>7} {'TTFT p50, ms':^23} {f'{cpu} per token':^36} "
        f"{'per message':^15}",
        f"{'chunk':>5} {'merge':>5} {'streams':>7} {'bare':>7} {'tw':>7} {'tw/bare':>7} "
        f"{'bare':>7} {'tw':>7} {'tw - bare':>10} {'bare/tw':>8} {'bare':>7} {'tw':>7} "
        f"{'errors':>6}",
    ]
    for row in report.rows:
        b, t = row.bare, row.tokenwire
        lines.append(
            f"{row.tokens_per_chunk:>5} {row.coalesce_chunks:>5} {row.clients:>7} "
            f"{b.ttft_p50_ms:>7.2f} {t.ttft_p50_ms:>7.2f} "
            f"{measure.format_ratio(row.ttft_ratio):>7} "
            f"{b.cpu_us_per_token:>7.1f} {t.cpu_us_per_token:>7.1f} "
            f"{t.cpu_us_per_token - b.cpu_us_per_token:>+10.1f} "
            f"{measure.format_ratio(row.cpu_ratio):>8} "
            f"{b.cpu_us_per_message:>7.1f} {t.cpu_us_per_message:>7.1f} {row.failed_turns:>6}"
        )
    lines += [
        "",
        "chunk: engine tokens per chunk; merge: server.coalesce_chunks, the most waiting chunks",
        "one Delta carries (1: one message per chunk). The floor always sends one token a message.",
        "tw/bare: tokenwire's median tokens/s over the floor's. per round: lowest and highest",
        "ratio of a round's back-to-back pair (the run's noise). msg/s and per message: every",
        "CompleteResponse the client received (tokenwire adds TurnStarted and TurnFinished).",
        "TTFT: request sent to first Delta, as the client sees it. CPU: this process's CPU time",
        *(
            [
                "(all threads) over the run; bare/tw is the throughput ratio a server with a core",
                "to itself would show, unmoved by other load on the machine.",
            ]
            if s.client_process
            else ["(all threads, the client's included) over the run."]
        ),
    ]
    if report.paced:
        lines += [
            "",
            f"TTFT at the same offered load ({s.paced_load:.0%} of the floor's saturated "
            "turns/s at each concurrency, paced starts):",
            f"{'streams':>7} {'turns/s':>8} {'bare p50':>9} {'tw p50':>7} {'tw/bare':>7} "
            f"{'bare p99':>9} {'tw p99':>7} {'errors':>6}",
        ]
        for paced in report.paced:
            b, t = paced.bare, paced.tokenwire
            lines.append(
                f"{paced.clients:>7} {paced.turns_per_s:>8.0f} {b.ttft_p50_ms:>9.2f} "
                f"{t.ttft_p50_ms:>7.2f} {measure.format_ratio(paced.ttft_ratio):>7} "
                f"{b.ttft_p99_ms:>9.2f} {t.ttft_p99_ms:>7.2f} {paced.failed_turns:>6}"
            )
    if report.warmup_errors:
        lines.append(f"warm-up failures by status: {report.warmup_errors}")
    return "\n".join(lines)


def bare_chain_config(coalesce_chunks: int) -> Config:
    """The smallest pipeline a server runs: errors and (disabled) authentication, nothing more."""
    base = config_for_tests()
    return config_for_tests(server=replace(base.server, coalesce_chunks=coalesce_chunks))


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.framework_overhead``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.framework_overhead", description=__doc__.splitlines()[0]
    )
    measure.add_run_options(p, quick="a short run (about 30 s on 2 cores)")
    p.add_argument(
        "--per-message",
        action=argparse.BooleanOptionalAction,
        help="the row at the most streams with server.coalesce_chunks = 1 (default: on)",
    )
    p.add_argument(
        "--coalesced-chunk", type=int, help="engine tokens per chunk of the last row; 0: none"
    )
    p.add_argument(
        "--paced-load",
        type=float,
        help="TTFT rows at this share of the floor's saturated turns/s, the same load sent "
        "to both servers (default: 0.5); 0: none",
    )
    p.add_argument(
        "--full-chain",
        action=argparse.BooleanOptionalAction,
        help="auth, quotas and moderation on (default); --no-full-chain: authentication off, "
        "no quotas, no moderation",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the report; exit 1 if any turn failed."""
    args = build_parser().parse_args(argv)
    settings = measure.settings_from_args(
        args,
        DEFAULT,
        QUICK,
        per_message=args.per_message,
        coalesced_chunk=args.coalesced_chunk,
        full_chain=args.full_chain,
        paced_load=args.paced_load,
    )
    # Per-call info lines would cost more than the streaming they describe.
    configure_logging(LoggingConfig(level="warning"))
    report = asyncio.run(measure_overhead(settings))
    print(json.dumps(report.summary(), indent=2) if args.json else format_report(report))
    if report.failed_turns:
        print(f"{report.failed_turns} turns failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
