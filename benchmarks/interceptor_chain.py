"""Pipeline cost: one server with the smallest chain it accepts and with every part on, in one run.

The same Tokenwire server (``running_server``: the model frontend and detokenizer,
a real SQLite ``:memory:`` conversation store) over ``FakeBackend(endless=True,
tokens_per_chunk=1)``, an engine that costs nothing and yields one token per
chunk, with ``server.coalesce_chunks = 1`` (``--coalesce-chunks``), so the
server sends one message per token (the worst case), runs as:

* **none**: the smallest chain a server accepts, ``[ErrorsInterceptor(),
  AuthInterceptor(AuthConfig(enabled=False), data_dir)]`` (every caller
  anonymous), and no turn policies (``policies=[]``);
* **chain**: the server's own pipeline (:func:`tokenwire.pipeline.build_pipeline`,
  so in its declared order) for a config with every part on, checked to hold
  them all: per call ``ErrorsInterceptor`` → ``AuthInterceptor`` (API keys in a
  real SQLite key store in a temporary data directory, the default key cache) →
  ``QuotaInterceptor`` (memory store; a plan that limits requests/min,
  tokens/min and concurrent streams, each far above the load, so every
  dimension is checked and none refuses); per turn ``CredentialPolicy`` (the key
  checked again) → ``QuotaPolicy`` (tokens reserved and settled) →
  ``ModerationPolicy`` (the built-in rules, input and output);
* **chain-redis** (when Redis answers at ``--redis-url``): the same pipeline with
  the Redis quota store, under a key prefix of its own.

One API key is created for the benchmark's principal through the key store and
every client sends ``authorization: Bearer <key>`` (to every arm, so the clients
are the same). The load, the interleaved rounds, the medians and the client in
its own process are those of :mod:`benchmarks.measure`: figures are medians over
rounds, the ratio is an arm's tokens/s over the none arm's, its cost is
``1 - ratio``, and this process's CPU time per token is the servers' (Redis's
own CPU is not in it). The target is a pipeline that costs under 15% of
throughput. Any failed turn (a refusal included) fails the run (exit 1).

    python -m benchmarks.interceptor_chain            # about 2 minutes on 2 cores
    python -m benchmarks.interceptor_chain --quick    # about 30 seconds (45 with Redis)
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
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from benchmarks import measure
from benchmarks.loadgen import LoadJob
from benchmarks.servers import (
    bench_backend,
    describe_pipeline,
    full_chain_config,
    full_chain_server,
    issue_key,
    quota_config,
)
from tokenwire.auth import AuthConfig
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.config import LoggingConfig
from tokenwire.interceptors import ErrorsInterceptor
from tokenwire.logs import configure_logging
from tokenwire.quotas import QuotaStoreError, create_quota_store
from tokenwire.testing import RunningServer, config_for_tests, running_server

__all__ = [
    "ARMS",
    "DEFAULT",
    "QUICK",
    "ChainReport",
    "ChainRow",
    "ChainSettings",
    "format_report",
    "main",
    "measure_chain",
]

ARMS = ("none", "chain", "chain-redis")  # report order; "none" is every ratio's base
_LABELS = {
    "none": "none",
    "chain": "chain (memory quotas)",
    "chain-redis": "chain (Redis quotas)",
}


@dataclass(frozen=True, slots=True)
class ChainSettings(measure.RunSettings):
    """What to measure and for how long."""

    redis_url: str = "redis://127.0.0.1:6379/0"  # the chain-redis arm's store; "": no such arm
    coalesce_chunks: int = 1  # every arm's server.coalesce_chunks; 1: one message per token
    target_cost: float = 0.15  # the most throughput the pipeline may cost


DEFAULT = ChainSettings()
QUICK = replace(DEFAULT, tokens_per_run=10_000, min_turns=2, rounds=2)


@dataclass(slots=True)
class ChainRow:
    """One concurrency: the same load against every arm, once per round."""

    clients: int
    turns: int  # per client and measurement
    arms: dict[str, measure.ArmResult]  # by arm name, in report order, "none" first

    def ratio(self, arm: str) -> float:
        """``arm``'s median tokens/s over the none arm's (1.0: the chain costs nothing)."""
        return measure.ratio(self.arms[arm], self.arms["none"])

    def cost(self, arm: str) -> float:
        """The share of throughput ``arm`` loses: ``1 - ratio``."""
        return 1.0 - self.ratio(arm)

    def round_ratios(self, arm: str) -> list[float]:
        """``arm`` over none within each round: their spread shows the run's noise."""
        return measure.round_ratios(self.arms[arm], self.arms["none"])

    def cpu_cost(self, arm: str) -> float:
        """The throughput cost a server with a core to itself would show, from CPU per token."""
        chain = self.arms[arm].cpu_us_per_token
        return 1.0 - self.arms["none"].cpu_us_per_token / chain if chain > 0 else math.nan

    @property
    def failed_turns(self) -> int:
        return sum(arm.failed_turns for arm in self.arms.values())

    def summary(self) -> dict[str, Any]:
        """The row's figures as JSON-ready values."""
        chains = [name for name in self.arms if name != "none"]
        return {
            "streams": self.clients,
            "turns_per_client": self.turns,
            "ratio": {name: measure.finite(self.ratio(name), 4) for name in chains},
            "cost": {name: measure.finite(self.cost(name), 4) for name in chains},
            "cpu_cost": {name: measure.finite(self.cpu_cost(name), 4) for name in chains},
            "round_ratios": {
                name: [measure.finite(r, 4) for r in self.round_ratios(name)] for name in chains
            },
            "arms": {name: arm.summary() for name, arm in self.arms.items()},
        }


@dataclass(slots=True)
class ChainReport:
    """Everything one run measured."""

    settings: ChainSettings
    rows: list[ChainRow]
    arms: tuple[str, ...]  # the arms measured, "none" first
    pipelines: dict[str, str]  # each arm's chain and turn policies, by arm
    cpus: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)  # e.g. why an arm was skipped
    warmup_errors: dict[str, int] = field(default_factory=dict)  # status code → failed turns

    @property
    def failed_turns(self) -> int:
        """Failed turns in every measurement and in the warm-up."""
        return sum(row.failed_turns for row in self.rows) + sum(self.warmup_errors.values())

    def meets_target(self, arm: str = "chain") -> bool:
        """Whether ``arm`` costs less than the target at every concurrency."""
        return all(row.cost(arm) < self.settings.target_cost for row in self.rows)

    def summary(self) -> dict[str, Any]:
        """The report as a JSON-ready object."""
        return {
            "settings": asdict(self.settings),
            "arms": list(self.arms),
            "pipelines": self.pipelines,
            "cpus": self.cpus,
            "elapsed_s": round(self.elapsed_s, 2),
            "notes": self.notes,
            "warmup_errors": self.warmup_errors,
            "meets_target": {arm: self.meets_target(arm) for arm in self.arms if arm != "none"},
            "rows": [row.summary() for row in self.rows],
        }


async def _redis_unreachable(url: str) -> str | None:
    """Why the Redis quota store cannot start at ``url``, or None when it can."""
    store = create_quota_store(quota_config("redis", url))
    try:
        await store.start()
    except QuotaStoreError as exc:
        return str(exc)
    finally:
        await store.close()
    return None


@contextlib.asynccontextmanager
async def _servers(
    settings: ChainSettings, data_dir: str, notes: list[str]
) -> AsyncIterator[dict[str, RunningServer]]:
    """Start one server per arm (all with ``settings.coalesce_chunks``); yields them by arm."""
    coalesce = settings.coalesce_chunks
    configs = {"chain": full_chain_config(data_dir, coalesce_chunks=coalesce)}
    if settings.redis_url:
        reason = await _redis_unreachable(settings.redis_url)
        if reason is None:
            quotas = quota_config("redis", settings.redis_url)
            configs["chain-redis"] = full_chain_config(data_dir, quotas, coalesce_chunks=coalesce)
        else:
            notes.append(f"chain-redis skipped: no Redis at {settings.redis_url} ({reason})")
    streams = max(settings.concurrency)
    base = config_for_tests()
    # The chain and policies below are given; the config says the same: nothing on.
    none_config = config_for_tests(
        server=replace(base.server, coalesce_chunks=coalesce),
        store=replace(base.store, data_dir=data_dir),
        quotas=replace(base.quotas, enabled=False),
        moderation=replace(base.moderation, enabled=False),
    )
    async with contextlib.AsyncExitStack() as stack:
        servers = {
            "none": await stack.enter_async_context(
                running_server(
                    bench_backend(1, streams),
                    none_config,
                    interceptors=[
                        ErrorsInterceptor(),
                        AuthInterceptor(AuthConfig(enabled=False), data_dir),
                    ],
                    policies=[],
                )
            )
        }
        for name, config in configs.items():
            servers[name] = await stack.enter_async_context(
                full_chain_server(bench_backend(1, streams), config)
            )
        yield servers


async def measure_chain(settings: ChainSettings = DEFAULT) -> ChainReport:
    """Measure every arm at every concurrency, interleaved over ``settings.rounds`` rounds."""
    settings.check()
    started = time.perf_counter()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tokenwire-bench-") as data_dir:
        async with contextlib.AsyncExitStack() as stack:
            servers = await stack.enter_async_context(_servers(settings, data_dir, notes))
            # The chains share the key store file in data_dir: one key serves them all.
            key = await issue_key(servers["chain"].server.pipeline)
            client = await stack.enter_async_context(measure.load_client(settings.client_process))
            arms = tuple(name for name in ARMS if name in servers)
            addresses = {name: servers[name].address for name in arms}
            pipelines = {name: describe_pipeline(servers[name].server.pipeline) for name in arms}
            rows = [
                ChainRow(
                    clients,
                    settings.turns_for(clients),
                    {name: measure.ArmResult() for name in arms},
                )
                for clients in settings.concurrency
            ]
            warm, warm_tokens = max(settings.concurrency), min(16, settings.max_tokens)
            warmup_errors = await measure.warm_up(
                client,
                [LoadJob(addresses[n], warm, 1, warm_tokens, api_key=key) for n in arms],
            )
            await measure.run_rounds(
                client,
                [
                    [
                        (
                            row.arms[name],
                            LoadJob(
                                addresses[name],
                                row.clients,
                                row.turns,
                                settings.max_tokens,
                                api_key=key,
                            ),
                        )
                        for name in arms
                    ]
                    for row in rows
                ],
                settings.rounds,
            )
    elapsed = time.perf_counter() - started
    cpus = os.cpu_count() or 0
    return ChainReport(settings, rows, arms, pipelines, cpus, elapsed, notes, warmup_errors)


def format_report(report: ChainReport) -> str:
    """The report as a table per concurrency, then the verdict on the target."""
    s = report.settings
    where = "its own process" if s.client_process else "the servers' event loop"
    cpu = "server CPU" if s.client_process else "CPU (server + client)"
    per = (
        "one message per token"
        if s.coalesce_chunks == 1
        else f"coalesce_chunks={s.coalesce_chunks}"
    )
    lines = [
        f"Tokenwire pipeline cost: one server (FakeBackend, {per}, SQLite :memory:) "
        "with the smallest chain it accepts vs the full pipeline",
        *(f"{_LABELS[name]}: {pipeline}" for name, pipeline in report.pipelines.items()),
        "auth: API key, SQLite key store, cached; quotas: requests/min, tokens/min, streams, "
        "none refused; moderation: rules, input + output",
        f"{report.cpus} CPUs; client in {where}; logging at warning; {s.max_tokens} tokens per "
        f"turn; medians of {s.rounds} interleaved rounds; {report.elapsed_s:.0f} s in all",
        *report.notes,
        "",
        f"{'streams':>7} {'arm':<21} {'tok/s':>7} {'msg/s':>7} {'x none':>7} {'per round':>10} "
        f"{'cost':>6} {'TTFT p50':>9} {'us/token':>9} {'+us':>6} {'us/msg':>7} {'errors':>6}",
    ]
    for row in report.rows:
        base = row.arms["none"]
        for name, arm in row.arms.items():
            chain = name != "none"
            extra = arm.cpu_us_per_token - base.cpu_us_per_token
            lines.append(
                f"{row.clients:>7} {_LABELS[name]:<21} {arm.tokens_per_s:>7.0f} "
                f"{arm.messages_per_s:>7.0f} "
                f"{measure.format_ratio(row.ratio(name)) if chain else '':>7} "
                f"{measure.format_spread(row.round_ratios(name)) if chain else '':>10} "
                f"{measure.format_pct(row.cost(name)) if chain else '':>6} "
                f"{arm.ttft_p50_ms:>7.2f}ms "
                f"{arm.cpu_us_per_token:>9.1f} {f'{extra:+.1f}' if chain else '':>6} "
                f"{arm.cpu_us_per_message:>7.1f} {arm.failed_turns:>6}"
            )
    lines += [
        "",
        "x none: an arm's median tokens/s over the none arm's; cost: 1 - that ratio.",
        "per round: lowest and highest ratio of a round's back-to-back runs (the noise).",
        f"us/token: {cpu} per token delivered (at one message per token a Delta carries one",
        "token; moderation merges a held-back word fragment now and then, so msg/s is a",
        "little lower); +us: the chain's CPU per token above none's; us/msg: per message of",
        "any kind (TurnStarted and TurnFinished included). TTFT: request sent to first Delta.",
        "",
        f"Target: the pipeline costs under {s.target_cost:.0%} of throughput.",
    ]
    for name in report.arms[1:]:
        for row in report.rows:
            cost, cpu_cost = row.cost(name), row.cpu_cost(name)
            verdict = "meets" if cost < s.target_cost else "MISSES"
            lines.append(
                f"  {_LABELS[name]}, {row.clients} streams: costs {measure.format_pct(cost)} "
                f"(from CPU per token: {measure.format_pct(cpu_cost)}): {verdict} the target"
            )
    if report.warmup_errors:
        lines.append(f"warm-up failures by status: {report.warmup_errors}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.interceptor_chain``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.interceptor_chain", description=__doc__.splitlines()[0]
    )
    measure.add_run_options(p, quick="a short run (about 30 s on 2 cores, 45 with Redis)")
    p.add_argument(
        "--redis-url",
        help=f"Redis of the chain-redis arm (default {DEFAULT.redis_url}); '' skips that arm",
    )
    p.add_argument(
        "--coalesce-chunks",
        type=int,
        help="every arm's server.coalesce_chunks (default 1: one message per token)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the report; exit 1 if any turn failed."""
    args = build_parser().parse_args(argv)
    settings = measure.settings_from_args(
        args, DEFAULT, QUICK, redis_url=args.redis_url, coalesce_chunks=args.coalesce_chunks
    )
    # Per-call info lines would cost more than the streaming they describe.
    configure_logging(LoggingConfig(level="warning"))
    report = asyncio.run(measure_chain(settings))
    print(json.dumps(report.summary(), indent=2) if args.json else format_report(report))
    if report.failed_turns:
        print(f"{report.failed_turns} turns failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
