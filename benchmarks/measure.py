"""How the benchmarks measure and report: the client, the rounds, the medians, the ratios.

* :func:`load_client`: the load generator in its own process (so this process's
  CPU time is the servers'), or on this event loop;
* :func:`warm_up` and :func:`run_rounds`: unmeasured runs first, then rounds
  that interleave the arms (the order flips every round), each run recorded
  with this process's CPU time during it;
* :class:`ArmResult`: one server's runs at one load and their medians (tokens/s,
  messages/s, TTFT p50, CPU per token and per message);
* :func:`ratio`, :func:`round_ratios`, :func:`format_ratio`, :func:`format_spread`,
  :func:`format_pct`, :func:`finite`: comparing arms and printing them;
* :class:`RunSettings`, :func:`add_run_options`, :func:`settings_from_args`,
  :func:`parse_counts`: the options every benchmark takes.

    async with bare_server() as floor, load_client(own_process=True) as client:
        arm = ArmResult()
        await run_rounds(client, [[(arm, LoadJob(floor, 16, 4, 128))]], rounds=3)
        print(arm.tokens_per_s, arm.cpu_us_per_token)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:  # loadgen imports this module; these are only types here
    from benchmarks.loadgen import LoadJob, LoadResult

__all__ = [
    "ArmResult",
    "LoadClient",
    "RunSettings",
    "add_run_options",
    "finite",
    "format_pct",
    "format_ratio",
    "format_spread",
    "load_client",
    "parse_counts",
    "ratio",
    "round_ratios",
    "run_rounds",
    "settings_from_args",
    "warm_up",
]

# --- measuring -------------------------------------------------------------------------


def finite(value: float, digits: int) -> float | None:
    """``value`` rounded, or None (JSON null) when it is NaN: nothing was measured."""
    return None if math.isnan(value) else round(value, digits)


@dataclass(slots=True)
class ArmResult:
    """One server's measurements at one load, one per round."""

    runs: list[LoadResult] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # this process's CPU time during each run

    def add(self, run: LoadResult, cpu_s: float) -> None:
        self.runs.append(run)
        self.cpu_s.append(cpu_s)

    def _cpu_us_per(self, count: Callable[[LoadResult], int]) -> float:
        return statistics.median(
            cpu / count(r) * 1e6 if count(r) else math.nan
            for r, cpu in zip(self.runs, self.cpu_s, strict=True)
        )

    @property
    def tokens_per_s(self) -> float:
        """Median aggregate tokens/s over the rounds."""
        return statistics.median(r.tokens_per_s for r in self.runs)

    @property
    def messages_per_s(self) -> float:
        """Median aggregate messages/s (every CompleteResponse) over the rounds."""
        return statistics.median(r.messages_per_s for r in self.runs)

    @property
    def turns_per_s(self) -> float:
        """Median completed turns/s over the rounds."""
        return statistics.median(r.turns_per_s for r in self.runs)

    @property
    def ttft_p50_ms(self) -> float:
        """Median over the rounds of each run's TTFT p50."""
        return statistics.median(r.ttft_p50_ms for r in self.runs)

    @property
    def ttft_p99_ms(self) -> float:
        """Median over the rounds of each run's TTFT p99."""
        return statistics.median(r.ttft_p99_ms for r in self.runs)

    @property
    def cpu_us_per_token(self) -> float:
        """Median CPU microseconds this process spent per token delivered.

        With the client in its own process that is the servers' CPU (all their
        threads); otherwise it includes the client's.
        """
        return self._cpu_us_per(lambda r: r.tokens)

    @property
    def cpu_us_per_message(self) -> float:
        """Median CPU microseconds per message the client received, of any kind."""
        return self._cpu_us_per(lambda r: r.messages)

    @property
    def failed_turns(self) -> int:
        return sum(r.failed_turns for r in self.runs)

    def summary(self) -> dict[str, Any]:
        """Median figures and every round's, JSON-ready."""
        return {
            "tokens_per_s": round(self.tokens_per_s, 1),
            "messages_per_s": round(self.messages_per_s, 1),
            "turns_per_s": round(self.turns_per_s, 1),
            "ttft_p50_ms": finite(self.ttft_p50_ms, 3),
            "ttft_p99_ms": finite(self.ttft_p99_ms, 3),
            "cpu_us_per_token": finite(self.cpu_us_per_token, 2),
            "cpu_us_per_message": finite(self.cpu_us_per_message, 2),
            "failed_turns": self.failed_turns,
            "rounds": [
                {**r.summary(), "cpu_s": round(cpu, 4)}
                for r, cpu in zip(self.runs, self.cpu_s, strict=True)
            ],
        }


def ratio(arm: ArmResult, base: ArmResult) -> float:
    """``arm``'s median tokens/s over ``base``'s (NaN when the base streamed nothing)."""
    rate = base.tokens_per_s
    return arm.tokens_per_s / rate if rate > 0 else math.nan


def round_ratios(arm: ArmResult, base: ArmResult) -> list[float]:
    """``arm``'s tokens/s over ``base``'s within each round: the spread is the run's noise."""
    return [
        a.tokens_per_s / b.tokens_per_s if b.tokens_per_s > 0 else math.nan
        for b, a in zip(base.runs, arm.runs, strict=True)
    ]


class LoadClient(Protocol):
    """Runs a :class:`~benchmarks.loadgen.LoadJob` and returns what it measured."""

    async def run(self, job: LoadJob) -> LoadResult: ...


class _SameLoopClient:
    """The client on the servers' event loop: both share one CPU."""

    async def run(self, job: LoadJob) -> LoadResult:
        return await job.run()


def _serve_jobs(conn: Connection) -> None:
    """The client process's main: run each job received, send back its result.

    ``None`` ends it; a failed job is answered with a one-line description.
    """

    async def serve() -> None:
        while (job := await asyncio.to_thread(conn.recv)) is not None:
            try:
                conn.send(await job.run())
            except Exception as exc:  # reported to the parent, which raises it
                conn.send(f"{type(exc).__name__}: {exc}")

    with conn:
        asyncio.run(serve())


class _ProcessClient:
    """The client in its own process, so the servers' process has its CPU to itself."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_jobs, args=(child,), name="loadgen-client", daemon=True
        )
        self._process.start()
        child.close()

    async def run(self, job: LoadJob) -> LoadResult:
        self._conn.send(job)
        answer = await asyncio.to_thread(self._conn.recv)
        if isinstance(answer, str):
            raise RuntimeError(f"the client process failed: {answer}")
        result: LoadResult = answer
        return result

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


async def warm_up(client: LoadClient, jobs: Sequence[LoadJob]) -> dict[str, int]:
    """Run ``jobs`` unmeasured (imports, first-call paths, connections, key caches);
    returns their failed turns by status code."""
    errors = Counter[str]()
    for job in jobs:
        errors.update((await client.run(job)).errors)
    return dict(errors)


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
                arms.reverse()
            for arm, job in arms:
                cpu = time.process_time()
                run = await client.run(job)
                arm.add(run, time.process_time() - cpu)


# --- reporting -------------------------------------------------------------------------


def format_ratio(value: float) -> str:
    """``0.97x``, or ``-`` for NaN."""
    return "-" if math.isnan(value) else f"{value:.2f}x"


def format_spread(values: Sequence[float]) -> str:
    """``0.73-1.50``: the lowest and highest of ``values``; empty for none."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else ""


def format_pct(value: float) -> str:
    """``12.9%``, or ``-`` for NaN."""
    return "-" if math.isnan(value) else f"{value:.1%}"


# --- command lines ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunSettings:
    """What every benchmark run takes: the loads and how long to measure each."""

    concurrency: tuple[int, ...] = (16, 64)  # concurrent streams, one row each
    max_tokens: int = 128  # tokens per turn
    tokens_per_run: int = 28_000  # tokens one measurement streams (sets turns per client)
    min_turns: int = 4  # per client and measurement, so a run is more than its ramp-up
    rounds: int = 5  # interleaved rounds; figures are medians over them
    client_process: bool = True  # run the client in its own process

    def turns_for(self, clients: int) -> int:
        """Turns per client in one measurement at ``clients`` streams."""
        return max(self.min_turns, math.ceil(self.tokens_per_run / (clients * self.max_tokens)))

    def check(self) -> None:
        """ValueError unless there is something to measure."""
        if not self.concurrency or self.rounds < 1 or self.max_tokens < 1:
            raise ValueError("need at least one concurrency, one round and max_tokens >= 1")


_Settings = TypeVar("_Settings", bound=RunSettings)


def parse_counts(text: str) -> tuple[int, ...]:
    """``"1,16,64"`` as ``(1, 16, 64)``; an argparse type (every count at least 1)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or N,N,...: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1: {text!r}")
    return values


def add_run_options(parser: argparse.ArgumentParser, quick: str) -> None:
    """Add the options of :class:`RunSettings`, ``--quick`` (help: ``quick``) and ``--json``."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--concurrency", type=parse_counts, metavar="N[,N...]", help="streams per row"
    )
    parser.add_argument("--max-tokens", type=int, help="tokens per turn")
    parser.add_argument("--tokens-per-run", type=int, help="tokens one measurement streams")
    parser.add_argument("--rounds", type=int, help="interleaved rounds; figures are medians")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run the client on the servers' event loop instead of its own process",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON object instead of a table"
    )


def settings_from_args(
    args: argparse.Namespace, default: _Settings, quick: _Settings, **extra: Any
) -> _Settings:
    """``quick`` or ``default`` with the options given on the command line (and the
    benchmark's own, ``extra``; None: not given) in place of theirs."""
    overrides: dict[str, Any] = {
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "tokens_per_run": args.tokens_per_run,
        "rounds": args.rounds,
        **extra,
    }
    if args.same_process:
        overrides["client_process"] = False
    base = quick if args.quick else default
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
