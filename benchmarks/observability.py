"""What metrics and tracing cost per token: the same server with them off and on, in one run.

Three servers with the full pipeline of :func:`benchmarks.servers.full_chain_config`
(API keys, quotas, moderation) over the zero-cost engine, one message per token
(``server.coalesce_chunks = 1``, the worst case), run side by side:

* **off**: metrics and tracing off (the defaults);
* **metrics**: ``[metrics]`` on, the endpoint served on a free port;
* **metrics+tracing**: also ``[tracing]`` on, every span exported in batches as the
  OTLP exporter does, to an exporter that drops them (the collector's own work is
  not this process's).

The load, the interleaved rounds and the medians are those of
:mod:`benchmarks.measure`; printed per concurrency: tokens/s, the ratio to off,
and this process's CPU per token with what each arm adds to it.

    python -m benchmarks.observability            # about 2 minutes on 2 cores
    python -m benchmarks.observability --quick    # about 30 seconds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from benchmarks import measure
from benchmarks.loadgen import LoadJob
from benchmarks.servers import bench_backend, full_chain_config, issue_key
from tokenwire.config import Config, LoggingConfig
from tokenwire.logs import configure_logging
from tokenwire.metrics.config import MetricsConfig
from tokenwire.testing import RunningServer, running_server
from tokenwire.tracing.config import TracingConfig
from tokenwire.tracing.spans import Tracing

__all__ = ["ARMS", "QUICK", "ObservabilityRow", "format_report", "main", "measure_observability"]

ARMS = ("off", "metrics", "metrics+tracing")
DEFAULT = measure.RunSettings()
QUICK = replace(DEFAULT, tokens_per_run=10_000, min_turns=2, rounds=2)


class _Discard:
    """A span exporter that keeps nothing (the spans are still built and batched)."""

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


@dataclass(slots=True)
class ObservabilityRow:
    """One concurrency: the same load against every arm, once per round."""

    clients: int
    turns: int
    arms: dict[str, measure.ArmResult]

    def ratio(self, arm: str) -> float:
        return measure.ratio(self.arms[arm], self.arms["off"])

    def extra_us(self, arm: str) -> float:
        """CPU per token ``arm`` adds to off's."""
        return self.arms[arm].cpu_us_per_token - self.arms["off"].cpu_us_per_token


def _config(data_dir: str, arm: str) -> Config:
    config = full_chain_config(data_dir, coalesce_chunks=1)
    if arm != "off":
        config = replace(config, metrics=MetricsConfig(enabled=True, listen="127.0.0.1:0"))
    if arm == "metrics+tracing":
        config = replace(config, tracing=TracingConfig(enabled=True))
    return config


@contextlib.asynccontextmanager
async def _servers(data_dir: str, streams: int) -> AsyncIterator[dict[str, RunningServer]]:
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for arm in ARMS:
            config = _config(data_dir, arm)
            tracing = (
                Tracing(config.tracing, exporter=_Discard(), batch=True)
                if config.tracing.enabled
                else None
            )
            servers[arm] = await stack.enter_async_context(
                running_server(bench_backend(1, streams), config, tracing=tracing)
            )
        yield servers


async def measure_observability(
    settings: measure.RunSettings = DEFAULT,
) -> tuple[list[ObservabilityRow], float]:
    """Every arm at every concurrency, interleaved; the rows and the seconds it took."""
    settings.check()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokenwire-bench-") as data_dir:
        async with contextlib.AsyncExitStack() as stack:
            servers = await stack.enter_async_context(_servers(data_dir, max(settings.concurrency)))
            key = await issue_key(servers["off"].server.pipeline)
            client = await stack.enter_async_context(measure.load_client(settings.client_process))
            rows = [
                ObservabilityRow(
                    clients,
                    settings.turns_for(clients),
                    {arm: measure.ArmResult() for arm in ARMS},
                )
                for clients in settings.concurrency
            ]
            warm = min(16, settings.max_tokens)
            await measure.warm_up(
                client,
                [
                    LoadJob(servers[arm].address, max(settings.concurrency), 1, warm, api_key=key)
                    for arm in ARMS
                ],
            )
            await measure.run_rounds(
                client,
                [
                    [
                        (
                            row.arms[arm],
                            LoadJob(
                                servers[arm].address,
                                row.clients,
                                row.turns,
                                settings.max_tokens,
                                api_key=key,
                            ),
                        )
                        for arm in ARMS
                    ]
                    for row in rows
                ],
                settings.rounds,
            )
    return rows, time.perf_counter() - started


def format_report(rows: Sequence[ObservabilityRow], settings: measure.RunSettings, s: float) -> str:
    lines = [
        "Metrics and tracing cost: the full pipeline (FakeBackend, one message per token), "
        "off and on, in one run",
        f"{os.cpu_count()} CPUs; {settings.max_tokens} tokens per turn; medians of "
        f"{settings.rounds} interleaved rounds; {s:.0f} s in all",
        "",
        f"{'streams':>7} {'arm':<16} {'tok/s':>7} {'x off':>6} {'per round':>10} "
        f"{'us/token':>9} {'+us':>6} {'errors':>6}",
    ]
    for row in rows:
        for arm, result in row.arms.items():
            on = arm != "off"
            spread = measure.format_spread(measure.round_ratios(result, row.arms["off"]))
            lines.append(
                f"{row.clients:>7} {arm:<16} {result.tokens_per_s:>7.0f} "
                f"{measure.format_ratio(row.ratio(arm)) if on else '':>6} "
                f"{spread if on else '':>10} "
                f"{result.cpu_us_per_token:>9.1f} {f'{row.extra_us(arm):+.1f}' if on else '':>6} "
                f"{result.failed_turns:>6}"
            )
    lines += [
        "",
        "x off: an arm's median tokens/s over off's; us/token: this process's CPU per token "
        "delivered; +us: what the arm adds to it.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the report; exit 1 if any turn failed."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.observability", description=__doc__.splitlines()[0]
    )
    measure.add_run_options(parser, quick="a short run (about 30 s on 2 cores)")
    args = parser.parse_args(argv)
    settings = measure.settings_from_args(args, DEFAULT, QUICK)
    configure_logging(LoggingConfig(level="warning"))
    rows, seconds = asyncio.run(measure_observability(settings))
    print(format_report(rows, settings, seconds))
    failed = sum(a.failed_turns for row in rows for a in row.arms.values())
    if failed:
        print(f"{failed} turns failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
