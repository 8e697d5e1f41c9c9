"""Framework overhead per streamed message: Tokenwire against a bare grpc.aio floor, in one run.

Two servers answer ``ChatService.Complete`` with turns of M tokens each:

* **tokenwire**: the full server (``running_server``: default interceptors, the
  model frontend and detokenizer, a real SQLite ``:memory:`` conversation store)
  over ``FakeBackend(endless=True)``, an engine that costs nothing, so what is
  measured is the framework. With ``tokens_per_chunk=1`` the engine yields one
  token per chunk and the server sends one message per token, the worst case;
  the coalesced row uses ``tokens_per_chunk=8``.
* **bare**: a plain ``grpc.aio`` server whose Complete yields M copies of one
  precomputed ``CompleteResponse(delta=Delta(text="x", token_count=1))``: the
  least any Python gRPC server can do for the same answer (the floor).

The same load generator (``benchmarks.loadgen.run_load``) drives both at each
concurrency, in interleaved rounds (the order flips every round); each figure is
the median over rounds and the ratio is tokenwire's tokens/s over the floor's.
By default the client runs in a separate process, so the servers keep this
process's CPU to themselves and the CPU time this process spends during a run is
the server's: reported per token, it gives a second ratio that other load on the
machine does not move. ``--same-process`` puts client and servers on one loop.

    python -m benchmarks.framework_overhead            # about 2 minutes on 2 cores
    python -m benchmarks.framework_overhead --quick    # about 15 seconds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import grpc

from benchmarks.loadgen import LoadJob, LoadResult, serve_load_jobs
from tokenwire.config import LoggingConfig
from tokenwire.logs import configure_logging
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc
from tokenwire.testing import FakeBackend, config_for_tests, running_server

__all__ = [
    "DEFAULT",
    "QUICK",
    "ArmResult",
    "LoadClient",
    "OverheadReport",
    "OverheadSettings",
    "RowResult",
    "bare_server",
    "format_report",
    "load_client",
    "main",
    "measure_overhead",
    "run_rounds",
]

# ASCII only: with the byte tokenizer every token is then one character and one Delta.
_REPLY = "Once upon a time, a keeper lit the lamp every night. "
_Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class OverheadSettings:
    """What to measure and for how long."""

    concurrency: tuple[int, ...] = (1, 16, 64)  # concurrent streams, one row each
    max_tokens: int = 128  # M: tokens per turn
    tokens_per_run: int = 28_000  # tokens one measurement streams (sets turns per client)
    min_turns: int = 4  # per client and measurement, so a run is more than its ramp-up
    rounds: int = 5  # interleaved bare/tokenwire rounds; figures are medians over them
    coalesced_chunk: int = 8  # engine tokens per chunk of the extra row; 0: no such row
    client_process: bool = True  # run the client in its own process

    def turns_for(self, clients: int) -> int:
        """Turns per client in one measurement at ``clients`` streams."""
        return max(self.min_turns, math.ceil(self.tokens_per_run / (clients * self.max_tokens)))

    def rows(self) -> list[tuple[int, int]]:
        """``(streams, engine tokens per chunk)`` of every row, in report order."""
        rows = [(clients, 1) for clients in self.concurrency]
        if self.coalesced_chunk > 1:
            rows.append((max(self.concurrency), self.coalesced_chunk))
        return rows


DEFAULT = OverheadSettings()
QUICK = OverheadSettings(tokens_per_run=10_000, min_turns=2, rounds=2)


def _finite(value: float, digits: int) -> float | None:
    """``value`` rounded, or None (JSON null) when it is NaN: nothing was measured."""
    return None if math.isnan(value) else round(value, digits)


@dataclass(slots=True)
class ArmResult:
    """One server's measurements in one row, one per round."""

    runs: list[LoadResult] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # this process's CPU time during each run

    def add(self, run: LoadResult, cpu_s: float) -> None:
        self.runs.append(run)
        self.cpu_s.append(cpu_s)

    @property
    def tokens_per_s(self) -> float:
        """Median aggregate tokens/s over the rounds."""
        return statistics.median(r.tokens_per_s for r in self.runs)

    @property
    def messages_per_s(self) -> float:
        """Median aggregate messages/s over the rounds."""
        return statistics.median(r.messages_per_s for r in self.runs)

    @property
    def ttft_p50_ms(self) -> float:
        """Median over the rounds of each run's TTFT p50."""
        return statistics.median(r.ttft_p50_ms for r in self.runs)

    @property
    def cpu_us_per_token(self) -> float:
        """Median CPU microseconds this process spent per token delivered.

        With the client in its own process that is the server's CPU (all its
        threads); otherwise it includes the client's.
        """
        return statistics.median(
            cpu / r.tokens * 1e6 if r.tokens else math.nan
            for r, cpu in zip(self.runs, self.cpu_s, strict=True)
        )

    @property
    def failed_turns(self) -> int:
        return sum(r.failed_turns for r in self.runs)

    def summary(self) -> dict[str, Any]:
        """Median figures and every round's, JSON-ready."""
        return {
            "tokens_per_s": round(self.tokens_per_s, 1),
            "messages_per_s": round(self.messages_per_s, 1),
            "ttft_p50_ms": _finite(self.ttft_p50_ms, 3),
            "cpu_us_per_token": _finite(self.cpu_us_per_token, 2),
            "failed_turns": self.failed_turns,
            "rounds": [
                {**r.summary(), "cpu_s": round(cpu, 4)}
                for r, cpu in zip(self.runs, self.cpu_s, strict=True)
            ],
        }


@dataclass(slots=True)
class RowResult:
    """One row: the same load against both servers, once per round."""

    clients: int
    tokens_per_chunk: int
    turns: int  # per client and measurement
    bare: ArmResult = field(default_factory=ArmResult)
    tokenwire: ArmResult = field(default_factory=ArmResult)

    @property
    def ratio(self) -> float:
        """Tokenwire's median tokens/s over the bare floor's (1.0: no overhead)."""
        bare = self.bare.tokens_per_s
        return self.tokenwire.tokens_per_s / bare if bare > 0 else math.nan

    @property
    def cpu_ratio(self) -> float:
        """The floor's CPU per token over tokenwire's: the throughput ratio a server
        would reach with a core to itself, and far less noisy than wall-clock rates."""
        tokenwire = self.tokenwire.cpu_us_per_token
        return self.bare.cpu_us_per_token / tokenwire if tokenwire > 0 else math.nan

    @property
    def round_ratios(self) -> list[float]:
        """Tokenwire over bare within each round: their spread shows the run's noise."""
        return [
            t.tokens_per_s / b.tokens_per_s if b.tokens_per_s > 0 else math.nan
            for b, t in zip(self.bare.runs, self.tokenwire.runs, strict=True)
        ]

    @property
    def failed_turns(self) -> int:
        return self.bare.failed_turns + self.tokenwire.failed_turns

    def summary(self) -> dict[str, Any]:
        """The row's figures as JSON-ready values."""
        return {
            "streams": self.clients,
            "engine_tokens_per_chunk": self.tokens_per_chunk,
            "turns_per_client": self.turns,
            "ratio": _finite(self.ratio, 4),
            "round_ratios": [_finite(r, 4) for r in self.round_ratios],
            "cpu_ratio": _finite(self.cpu_ratio, 4),
            "bare": self.bare.summary(),
            "tokenwire": self.tokenwire.summary(),
        }


@dataclass(slots=True)
class OverheadReport:
    """Everything one run measured."""

    settings: OverheadSettings
    rows: list[RowResult]
    cpus: int
    elapsed_s: float

    def summary(self) -> dict[str, Any]:
        """The report as a JSON-ready object."""
        return {
            "settings": asdict(self.settings),
            "cpus": self.cpus,
            "elapsed_s": round(self.elapsed_s, 2),
            "rows": [row.summary() for row in self.rows],
        }


class _BareChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """The floor: Complete streams ``max_tokens`` copies of one prebuilt Delta message."""

    _DELTA = chat_pb2.CompleteResponse(delta=chat_pb2.Delta(text="x", token_count=1))

    async def Complete(
        self, request: chat_pb2.CompleteRequest, context: _Context
    ) -> AsyncIterator[chat_pb2.CompleteResponse]:
        message = self._DELTA
        for _ in range(request.params.max_tokens):
            yield message

    def Converse(
        self, request_iterator: Any, context: _Context
    ) -> AsyncIterator[chat_pb2.ConverseResponse]:
        raise NotImplementedError("the bare floor serves Complete only")


@contextlib.asynccontextmanager
async def bare_server() -> AsyncIterator[str]:
    """A bare grpc.aio ChatService on 127.0.0.1 (Complete only); yields its address."""
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(_BareChatServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


class LoadClient(Protocol):
    """Runs a :class:`LoadJob` and returns what it measured."""

    async def run(self, job: LoadJob) -> LoadResult: ...


class _SameLoopClient:
    """The client on the servers' event loop: both share one CPU."""

    async def run(self, job: LoadJob) -> LoadResult:
        return await job.run()


class _ProcessClient:
    """The client in its own process, so the servers' process has its CPU to itself."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=serve_load_jobs, args=(child,), name="loadgen-client", daemon=True
        )
        self._process.start()
        child.close()

    async def run(self, job: LoadJob) -> LoadResult:
        self._conn.send(job)
        answer = await asyncio.to_thread(self._conn.recv)
        if not isinstance(answer, LoadResult):
            raise RuntimeError(f"the client process failed: {answer}")
        return answer

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        await asyncio.to_thread(self._process.join, 10)
        if self._process.is_alive():
            self._process.terminate()
            await asyncio.to_thread(self._process.join, 10)
        self._conn.close()


@contextlib.asynccontextmanager
async def load_client(own_process: bool) -> AsyncIterator[LoadClient]:
    """A load client in its own process (``own_process``) or on this event loop."""
    if not own_process:
        yield _SameLoopClient()
        return
    client = _ProcessClient()
    try:
        yield client
    finally:
        await client.close()


async def run_rounds(
    client: LoadClient, rows: Sequence[Sequence[tuple[ArmResult, LoadJob]]], rounds: int
) -> None:
    """Run each row's jobs once per round, adding each run to its arm.

    Within a row the arms run back to back, in reverse order every other round
    so that none always goes first; each run is recorded with this process's CPU
    time during it.
    """
    for round_index in range(rounds):
        for row in rows:
            arms = list(row)
            if round_index % 2:
                arms.reverse()  # neither server always goes first
            for arm, job in arms:
                cpu = time.process_time()
                run = await client.run(job)
                arm.add(run, time.process_time() - cpu)


async def measure_overhead(settings: OverheadSettings = DEFAULT) -> OverheadReport:
    """Run every row against both servers, interleaved over ``settings.rounds`` rounds."""
    if not settings.concurrency or settings.rounds < 1 or settings.max_tokens < 1:
        raise ValueError("need at least one concurrency, one round and max_tokens >= 1")
    started = time.perf_counter()
    rows = [
        RowResult(clients, chunk, settings.turns_for(clients)) for clients, chunk in settings.rows()
    ]
    async with contextlib.AsyncExitStack() as stack:
        bare = await stack.enter_async_context(bare_server())
        tokenwire: dict[int, str] = {}
        for chunk in sorted({row.tokens_per_chunk for row in rows}):
            backend = FakeBackend(
                reply=_REPLY,
                endless=True,
                tokens_per_chunk=chunk,
                # Admission is not under test: room for every stream.
                max_running=max(1024, 2 * max(settings.concurrency)),
            )
            running = await stack.enter_async_context(running_server(backend, config_for_tests()))
            tokenwire[chunk] = running.address
        client = await stack.enter_async_context(load_client(settings.client_process))
        # Warm-up: imports, first-call paths and connections, not measured.
        warm = max(settings.concurrency)
        for target in (bare, *tokenwire.values()):
            await client.run(LoadJob(target, warm, 1, min(16, settings.max_tokens)))
        await run_rounds(
            client,
            [
                [
                    (arm, LoadJob(target, row.clients, row.turns, settings.max_tokens))
                    for arm, target in (
                        (row.bare, bare),
                        (row.tokenwire, tokenwire[row.tokens_per_chunk]),
                    )
                ]
                for row in rows
            ],
            settings.rounds,
        )
    return OverheadReport(settings, rows, os.cpu_count() or 0, time.perf_counter() - started)


def format_report(report: OverheadReport) -> str:
    """The report as two tables with a short header saying how it was measured."""
    s = report.settings
    where = "its own process" if s.client_process else "the servers' event loop"
    cpu = "server CPU" if s.client_process else "CPU (server + client)"
    lines = [
        "Tokenwire framework overhead: full server (FakeBackend, default interceptors, "
        "SQLite :memory:) vs a bare grpc.aio Complete (the floor)",
        f"{report.cpus} CPUs; client in {where}; per-call info logging off (level=warning); "
        f"{s.max_tokens} tokens per turn; medians of {s.rounds} interleaved rounds; "
        f"{report.elapsed_s:.0f} s in all",
        "",
        f"{'engine chunk':>12} {'streams':>7} {'turns':>6} {'bare tok/s':>10} {'tw tok/s':>9} "
        f"{'tw/bare':>7} {'per round':>10} {'bare msg/s':>10} {'tw msg/s':>9}",
    ]
    for row in report.rows:
        ratios = row.round_ratios
        lines.append(
            f"{_chunk(row):>12} {row.clients:>7} {row.clients * row.turns:>6} "
            f"{row.bare.tokens_per_s:>10.0f} {row.tokenwire.tokens_per_s:>9.0f} "
            f"{row.ratio:>6.2f}x {f'{min(ratios):.2f}-{max(ratios):.2f}':>10} "
            f"{row.bare.messages_per_s:>10.0f} {row.tokenwire.messages_per_s:>9.0f}"
        )
    lines += [
        "",
        f"{'':>12} {'':>7} {'TTFT p50, ms':^15} {f'{cpu}, us/token':^37}",
        f"{'engine chunk':>12} {'streams':>7} {'bare':>7} {'tw':>7} {'bare':>8} {'tw':>8} "
        f"{'tw - bare':>10} {'bare/tw':>8} {'errors':>6}",
    ]
    for row in report.rows:
        b, t = row.bare, row.tokenwire
        lines.append(
            f"{_chunk(row):>12} {row.clients:>7} {b.ttft_p50_ms:>7.2f} {t.ttft_p50_ms:>7.2f} "
            f"{b.cpu_us_per_token:>8.1f} {t.cpu_us_per_token:>8.1f} "
            f"{t.cpu_us_per_token - b.cpu_us_per_token:>+10.1f} {row.cpu_ratio:>7.2f}x "
            f"{row.failed_turns:>6}"
        )
    lines += [
        "",
        "tw/bare: tokenwire's median tokens/s over the floor's; at one token per message it is",
        "the message-rate ratio (tokenwire adds TurnStarted and TurnFinished to each turn).",
        "per round: lowest and highest ratio of a round's back-to-back pair (the run's noise).",
        "TTFT: request sent to first Delta, as the client sees it. The floor sends one token",
        "per message, so its us/token is per message. CPU: this process's CPU time (all",
        *(
            [
                "threads) over the run, per token delivered; bare/tw is the throughput ratio a",
                "server with a core to itself would show, unmoved by other load on the machine.",
            ]
            if s.client_process
            else ["threads, the client's included) over the run, per token delivered."]
        ),
    ]
    return "\n".join(lines)


def _chunk(row: RowResult) -> str:
    return f"{row.tokens_per_chunk} token" + ("s" if row.tokens_per_chunk > 1 else "")


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or N,N,...: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"stream counts must be >= 1: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.framework_overhead``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.framework_overhead", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="a short run (about 15 s on 2 cores)")
    p.add_argument("--concurrency", type=_counts, metavar="N[,N...]", help="streams per row")
    p.add_argument("--max-tokens", type=int, help="tokens per turn (M)")
    p.add_argument("--tokens-per-run", type=int, help="tokens one measurement streams")
    p.add_argument("--rounds", type=int, help="interleaved rounds; figures are medians")
    p.add_argument(
        "--coalesced-chunk", type=int, help="engine tokens per chunk of the extra row; 0: none"
    )
    p.add_argument(
        "--same-process",
        action="store_true",
        help="run the client on the servers' event loop instead of its own process",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the report; exit 1 if any turn failed."""
    args = build_parser().parse_args(argv)
    settings = QUICK if args.quick else DEFAULT
    overrides: dict[str, Any] = {
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "tokens_per_run": args.tokens_per_run,
        "rounds": args.rounds,
        "coalesced_chunk": args.coalesced_chunk,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.same_process:
        settings = replace(settings, client_process=False)
    # Per-call info lines would cost more than the streaming they describe.
    configure_logging(LoggingConfig(level="warning"))
    report = asyncio.run(measure_overhead(settings))
    print(json.dumps(report.summary(), indent=2) if args.json else format_report(report))
    return 1 if any(row.failed_turns for row in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
