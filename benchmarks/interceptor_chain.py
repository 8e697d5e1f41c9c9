"""Interceptor chain cost: one server with no interceptors and with the full chain, in one run.

The same Tokenwire server (``running_server``: the model frontend and detokenizer,
a real SQLite ``:memory:`` conversation store) over ``FakeBackend(endless=True,
tokens_per_chunk=1)``, an engine that costs nothing and yields one token per
chunk, so the server sends one message per token (the worst case), runs as:

* **none**: no interceptors at all (``interceptors=[]``);
* **chain**: the production chain, as ``default_interceptors`` builds it (so in
  its declared order) for a config with every part on: ``ErrorsInterceptor`` →
  ``AuthInterceptor`` (API keys in a real SQLite key store in a temporary data
  directory, the default key cache) → ``QuotaInterceptor`` (memory store; a plan
  that limits requests/min, tokens/min and concurrent streams, each far above
  the load, so every dimension is checked and none refuses) →
  ``ModerationInterceptor`` (the built-in rules, input and output);
* **chain-redis** (when Redis answers at ``--redis-url``): the same chain with
  the Redis quota store, under a key prefix of its own.

One API key is created for the benchmark's principal through the key store and
every client sends ``authorization: Bearer <key>`` (to every arm, so the clients
are the same). The load, the interleaved rounds, the medians and the client in
its own process are those of :mod:`benchmarks.framework_overhead`: figures are
medians over rounds, the ratio is an arm's tokens/s over the bare server's, its
cost is ``1 - ratio``, and this process's CPU time per token is the servers'
(Redis's own CPU is not in it). The target is a chain that costs under 15% of
throughput. Any failed turn (a refusal included) fails the run (exit 1).

    python -m benchmarks.interceptor_chain            # about 2 minutes on 2 cores
    python -m benchmarks.interceptor_chain --quick    # about 20 seconds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from benchmarks.framework_overhead import ArmResult, load_client, run_rounds
from benchmarks.loadgen import LoadJob
from tokenwire.auth.keys import make_principal
from tokenwire.config import Config, LoggingConfig
from tokenwire.interceptors import ErrorsInterceptor, Interceptor, default_interceptors
from tokenwire.interceptors.auth import AuthInterceptor
from tokenwire.interceptors.moderation import ModerationInterceptor
from tokenwire.interceptors.quotas import QuotaInterceptor
from tokenwire.logs import configure_logging
from tokenwire.moderation import ModerationConfig
from tokenwire.quotas import PlanLimits, QuotaConfig, QuotaStoreError, create_quota_store
from tokenwire.testing import FakeBackend, config_for_tests, running_server

__all__ = [
    "ARMS",
    "DEFAULT",
    "QUICK",
    "ChainReport",
    "ChainRow",
    "ChainSettings",
    "chain_config",
    "format_report",
    "full_chain",
    "main",
    "measure_chain",
]

ARMS = ("none", "chain", "chain-redis")  # report order; "none" is every ratio's base
_LABELS = {
    "none": "none",
    "chain": "chain (memory quotas)",
    "chain-redis": "chain (Redis quotas)",
}
# ASCII only: with the byte tokenizer every token is then one character.
_REPLY = "Once upon a time, a keeper lit the lamp every night. "
_TENANT, _USER, _PLAN = "bench", "bench", "bench"
_CHAIN_PARTS = (ErrorsInterceptor, AuthInterceptor, QuotaInterceptor, ModerationInterceptor)
# Far above any load here (a few hundred turns/s, 64 streams), yet every one is checked.
_PLAN_LIMITS = PlanLimits(
    requests_per_minute=10_000_000, tokens_per_minute=1_000_000_000, concurrent_streams=100_000
)


@dataclass(frozen=True, slots=True)
class ChainSettings:
    """What to measure and for how long."""

    concurrency: tuple[int, ...] = (16, 64)  # concurrent streams, one row each
    max_tokens: int = 128  # tokens per turn
    tokens_per_run: int = 28_000  # tokens one measurement streams (sets turns per client)
    min_turns: int = 4  # per client and measurement, so a run is more than its ramp-up
    rounds: int = 5  # interleaved rounds; figures are medians over them
    redis_url: str = "redis://127.0.0.1:6379/0"  # the chain-redis arm's store; "": no such arm
    client_process: bool = True  # run the client in its own process
    target_cost: float = 0.15  # the most throughput the chain may cost

    def turns_for(self, clients: int) -> int:
        """Turns per client in one measurement at ``clients`` streams."""
        return max(self.min_turns, math.ceil(self.tokens_per_run / (clients * self.max_tokens)))


DEFAULT = ChainSettings()
QUICK = ChainSettings(tokens_per_run=10_000, min_turns=2, rounds=2)


def _finite(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def _cpu_us_per_message(arm: ArmResult) -> float:
    """Median CPU microseconds per streamed message of any kind (TurnStarted and
    TurnFinished included), where ``cpu_us_per_token`` counts Delta tokens."""
    return statistics.median(
        cpu / r.messages * 1e6 if r.messages else math.nan
        for r, cpu in zip(arm.runs, arm.cpu_s, strict=True)
    )


@dataclass(slots=True)
class ChainRow:
    """One concurrency: the same load against every arm, once per round."""

    clients: int
    turns: int  # per client and measurement
    arms: dict[str, ArmResult]  # by arm name, in report order, "none" first

    def ratio(self, arm: str) -> float:
        """``arm``'s median tokens/s over the bare server's (1.0: the chain costs nothing)."""
        base = self.arms["none"].tokens_per_s
        return self.arms[arm].tokens_per_s / base if base > 0 else math.nan

    def cost(self, arm: str) -> float:
        """The share of throughput ``arm`` loses: ``1 - ratio``."""
        return 1.0 - self.ratio(arm)

    def round_ratios(self, arm: str) -> list[float]:
        """``arm`` over none within each round: their spread shows the run's noise."""
        return [
            a.tokens_per_s / b.tokens_per_s if b.tokens_per_s > 0 else math.nan
            for b, a in zip(self.arms["none"].runs, self.arms[arm].runs, strict=True)
        ]

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
            "ratio": {name: _finite(self.ratio(name), 4) for name in chains},
            "cost": {name: _finite(self.cost(name), 4) for name in chains},
            "cpu_cost": {name: _finite(self.cpu_cost(name), 4) for name in chains},
            "round_ratios": {
                name: [_finite(r, 4) for r in self.round_ratios(name)] for name in chains
            },
            "cpu_us_per_message": {
                name: _finite(_cpu_us_per_message(arm), 2) for name, arm in self.arms.items()
            },
            "arms": {name: arm.summary() for name, arm in self.arms.items()},
        }


@dataclass(slots=True)
class ChainReport:
    """Everything one run measured."""

    settings: ChainSettings
    rows: list[ChainRow]
    arms: tuple[str, ...]  # the arms measured, "none" first
    chain: tuple[str, ...]  # the chain's interceptors, outermost first
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
            "chain": list(self.chain),
            "cpus": self.cpus,
            "elapsed_s": round(self.elapsed_s, 2),
            "notes": self.notes,
            "warmup_errors": self.warmup_errors,
            "meets_target": {arm: self.meets_target(arm) for arm in self.arms if arm != "none"},
            "rows": [row.summary() for row in self.rows],
        }


def _quota_config(store: str, redis_url: str) -> QuotaConfig:
    return QuotaConfig(
        store=store,
        redis_url=redis_url,
        # A prefix of this run's own: no counters left by another run or service.
        key_prefix=f"tokenwire:bench:{uuid.uuid4().hex[:12]}:",
        plans={_PLAN: _PLAN_LIMITS},
        default_plan=_PLAN,
    )


def chain_config(data_dir: str, quotas: QuotaConfig) -> Config:
    """A server config with every part of the chain on (API keys kept in ``data_dir``)."""
    base = config_for_tests()
    return config_for_tests(
        # No bootstrap admin key: the benchmark makes its own key, and nothing is printed.
        auth=replace(base.auth, enabled=True, api_keys=True, bootstrap_admin_key=False),
        quotas=quotas,
        moderation=ModerationConfig(enabled=True, moderator="rules", input=True, output=True),
        store=replace(base.store, data_dir=data_dir),
    )


def full_chain(config: Config) -> list[Interceptor]:
    """The server's own chain for ``config`` (``default_interceptors``), checked to be complete."""
    chain = default_interceptors(config)
    missing = [t.__name__ for t in _CHAIN_PARTS if not any(isinstance(i, t) for i in chain)]
    if missing:
        raise RuntimeError(f"the default chain lacks {', '.join(missing)}; nothing to compare")
    return chain


async def _redis_unreachable(url: str) -> str | None:
    """Why the Redis quota store cannot start at ``url``, or None when it can."""
    store = create_quota_store(_quota_config("redis", url))
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
) -> AsyncIterator[tuple[dict[str, str], str, tuple[str, ...]]]:
    """Start one server per arm; yields their addresses by arm, the API key to send and
    the chain's interceptors by name."""
    configs = {
        "none": config_for_tests(),
        "chain": chain_config(data_dir, _quota_config("memory", settings.redis_url)),
    }
    if settings.redis_url:
        reason = await _redis_unreachable(settings.redis_url)
        if reason is None:
            configs["chain-redis"] = chain_config(
                data_dir, _quota_config("redis", settings.redis_url)
            )
        else:
            notes.append(f"chain-redis skipped: no Redis at {settings.redis_url} ({reason})")
    chains = {
        name: [] if name == "none" else full_chain(config) for name, config in configs.items()
    }
    addresses: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name, chain in chains.items():
            backend = FakeBackend(
                reply=_REPLY,
                endless=True,
                tokens_per_chunk=1,
                # Admission is not under test: room for every stream.
                max_running=max(1024, 2 * max(settings.concurrency)),
            )
            running = await stack.enter_async_context(
                running_server(backend, configs[name], interceptors=chain)
            )
            addresses[name] = running.address
        # Both chains share the key store file in data_dir: one key serves them all.
        auth = next(i for i in chains["chain"] if isinstance(i, AuthInterceptor))
        principal = make_principal(_TENANT, _USER, plan=_PLAN)
        issued = await auth.key_store.create_key(principal, description="interceptor_chain")
        yield addresses, issued.secret, tuple(type(i).__name__ for i in chains["chain"])


async def measure_chain(settings: ChainSettings = DEFAULT) -> ChainReport:
    """Measure every arm at every concurrency, interleaved over ``settings.rounds`` rounds."""
    if not settings.concurrency or settings.rounds < 1 or settings.max_tokens < 1:
        raise ValueError("need at least one concurrency, one round and max_tokens >= 1")
    started = time.perf_counter()
    notes: list[str] = []
    warmup_errors: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tokenwire-bench-") as data_dir:
        async with contextlib.AsyncExitStack() as stack:
            servers = _servers(settings, data_dir, notes)
            addresses, key, chain = await stack.enter_async_context(servers)
            client = await stack.enter_async_context(load_client(settings.client_process))
            arms = tuple(name for name in ARMS if name in addresses)
            rows = [
                ChainRow(clients, settings.turns_for(clients), {name: ArmResult() for name in arms})
                for clients in settings.concurrency
            ]
            # Warm-up: imports, first-call paths, connections, the key cache; not measured.
            warm = max(settings.concurrency)
            for name in arms:
                job = LoadJob(addresses[name], warm, 1, min(16, settings.max_tokens), api_key=key)
                for code, count in (await client.run(job)).errors.items():
                    warmup_errors[code] = warmup_errors.get(code, 0) + count
            await run_rounds(
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
    return ChainReport(settings, rows, arms, chain, cpus, elapsed, notes, warmup_errors)


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1%}"


def format_report(report: ChainReport) -> str:
    """The report as a table per concurrency, then the verdict on the target."""
    s = report.settings
    where = "its own process" if s.client_process else "the servers' event loop"
    cpu = "server CPU" if s.client_process else "CPU (server + client)"
    lines = [
        "Tokenwire interceptor chain cost: one server (FakeBackend, one token per message, "
        "SQLite :memory:) with no interceptors vs the full chain",
        "chain (default_interceptors): " + " -> ".join(report.chain),
        "auth: API key, SQLite key store, cached; quotas: requests/min, tokens/min, streams, "
        "none refused; moderation: rules, input + output",
        f"{report.cpus} CPUs; client in {where}; logging at warning; {s.max_tokens} tokens per "
        f"turn; medians of {s.rounds} interleaved rounds; {report.elapsed_s:.0f} s in all",
        *report.notes,
        "",
        f"{'streams':>7} {'arm':<21} {'tok/s':>7} {'msg/s':>7} {'x none':>7} {'per round':>10} "
        f"{'cost':>6} {'TTFT p50':>9} {'us/token':>9} {'+us':>6} {'errors':>6}",
    ]
    for row in report.rows:
        base = row.arms["none"]
        for name, arm in row.arms.items():
            chain = name != "none"
            ratios = row.round_ratios(name) if chain else []
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
            extra = arm.cpu_us_per_token - base.cpu_us_per_token
            lines.append(
                f"{row.clients:>7} {_LABELS[name]:<21} {arm.tokens_per_s:>7.0f} "
                f"{arm.messages_per_s:>7.0f} "
                f"{f'{row.ratio(name):.2f}x' if chain else '':>7} {spread:>10} "
                f"{_pct(row.cost(name)) if chain else '':>6} {arm.ttft_p50_ms:>7.2f}ms "
                f"{arm.cpu_us_per_token:>9.1f} {f'{extra:+.1f}' if chain else '':>6} "
                f"{arm.failed_turns:>6}"
            )
    lines += [
        "",
        "x none: an arm's median tokens/s over the bare server's; cost: 1 - that ratio.",
        "per round: lowest and highest ratio of a round's back-to-back runs (the noise).",
        f"us/token: {cpu} per token delivered (a Delta carries one token; moderation",
        "merges a held-back word fragment now and then, so msg/s is a little lower);",
        "+us: the chain's CPU per token above none's. TTFT: request sent to first Delta.",
        "",
        f"Target: the chain costs under {s.target_cost:.0%} of throughput.",
    ]
    for name in report.arms[1:]:
        for row in report.rows:
            verdict = "meets" if row.cost(name) < s.target_cost else "MISSES"
            lines.append(
                f"  {_LABELS[name]}, {row.clients} streams: costs {_pct(row.cost(name))} "
                f"(from CPU per token: {_pct(row.cpu_cost(name))}): {verdict} the target"
            )
    if report.warmup_errors:
        lines.append(f"warm-up failures by status: {report.warmup_errors}")
    return "\n".join(lines)


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or N,N,...: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"stream counts must be >= 1: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.interceptor_chain``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.interceptor_chain", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="a short run (about 20 s on 2 cores)")
    p.add_argument("--concurrency", type=_counts, metavar="N[,N...]", help="streams per row")
    p.add_argument("--max-tokens", type=int, help="tokens per turn")
    p.add_argument("--tokens-per-run", type=int, help="tokens one measurement streams")
    p.add_argument("--rounds", type=int, help="interleaved rounds; figures are medians")
    p.add_argument(
        "--redis-url",
        help=f"Redis of the chain-redis arm (default {DEFAULT.redis_url}); '' skips that arm",
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
        "redis_url": args.redis_url,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.same_process:
        settings = replace(settings, client_process=False)
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
