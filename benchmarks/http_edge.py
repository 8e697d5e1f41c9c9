"""What the HTTP edge adds: the same turns over gRPC and over OpenAI-compatible HTTP, one run.

One gateway with the full pipeline (API keys, quotas, moderation) and ``[http]`` on
serves both arms over the zero-cost engine:

* **grpc**: ``ChatService.Complete`` streamed, as :mod:`benchmarks.loadgen` sends it;
* **http**: ``POST /v1/chat/completions`` with ``stream: true`` and
  ``stream_options.include_usage``, read as server-sent events with httpx, the
  way OpenAI's SDKs do.

The HTTP edge forwards each request to the gateway's own gRPC services over a
private Unix socket, so the http arm also pays that hop. Printed per concurrency:
tokens/s, TTFT p50 and what HTTP adds to it, and this process's CPU per token (the
client runs in its own process).

    python -m benchmarks.http_edge            # about a minute on 2 cores
    python -m benchmarks.http_edge --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from benchmarks import measure
from benchmarks.loadgen import DEFAULT_PROMPT, LoadJob, LoadResult
from benchmarks.servers import bench_backend, full_chain_config, issue_key
from tokenwire.config import LoggingConfig
from tokenwire.edge.config import HttpConfig
from tokenwire.logs import configure_logging
from tokenwire.testing import running_server

__all__ = ["ARMS", "QUICK", "HttpLoadJob", "format_report", "main", "measure_edge"]

ARMS = ("grpc", "http")
DEFAULT = measure.RunSettings()
QUICK = replace(DEFAULT, tokens_per_run=10_000, min_turns=2, rounds=2)


@dataclass(frozen=True, slots=True)
class HttpLoadJob:
    """``clients`` concurrent clients of the OpenAI-compatible API, ``turns`` each."""

    base_url: str
    clients: int
    turns: int
    max_tokens: int
    api_key: str = ""
    prompt: str = DEFAULT_PROMPT

    async def run(self) -> LoadResult:
        """Run this load here (in the client process)."""
        import httpx

        result = LoadResult(self.clients, self.turns, self.max_tokens)
        headers = {"authorization": f"Bearer {self.api_key}"}
        body = {
            "model": "",
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        limits = httpx.Limits(max_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=60) as http:

            async def client() -> None:
                for _ in range(self.turns):
                    started = time.perf_counter()
                    first = True
                    async with http.stream(
                        "POST", "/v1/chat/completions", json=body, headers=headers
                    ) as reply:
                        if reply.status_code != 200:
                            code = str(reply.status_code)
                            result.errors[code] = result.errors.get(code, 0) + 1
                            await reply.aread()
                            continue
                        async for line in reply.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            choices = chunk.get("choices") or []
                            if choices and choices[0].get("delta", {}).get("content"):
                                result.deltas += 1
                                if first:
                                    result.ttft_s.append(time.perf_counter() - started)
                                    first = False
                            if chunk.get("usage"):
                                result.tokens += int(chunk["usage"]["completion_tokens"])
                    result.completed_turns += 1

            began = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(self.clients)))
            result.elapsed_s = time.perf_counter() - began
        return result


async def measure_edge(
    settings: measure.RunSettings = DEFAULT,
) -> tuple[list[tuple[int, dict[str, measure.ArmResult]]], float]:
    """Both arms at every concurrency, interleaved; the rows and the seconds it took."""
    settings.check()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokenwire-bench-") as data_dir:
        config = replace(
            full_chain_config(data_dir), http=HttpConfig(enabled=True, listen="127.0.0.1:0")
        )
        async with contextlib.AsyncExitStack() as stack:
            running = await stack.enter_async_context(
                running_server(bench_backend(1, max(settings.concurrency)), config)
            )
            assert running.server.http is not None
            base_url = f"http://127.0.0.1:{running.server.http.port}"
            key = await issue_key(running.server.pipeline)
            client = await stack.enter_async_context(measure.load_client(settings.client_process))

            def jobs(clients: int, turns: int, tokens: int) -> dict[str, LoadJob]:
                http = HttpLoadJob(base_url, clients, turns, tokens, api_key=key)
                return {
                    "grpc": LoadJob(running.address, clients, turns, tokens, api_key=key),
                    "http": http,  # type: ignore[dict-item]  # the client runs any job
                }

            warm = max(settings.concurrency)
            await measure.warm_up(client, list(jobs(warm, 1, 16).values()))
            rows = [
                (clients, {arm: measure.ArmResult() for arm in ARMS})
                for clients in settings.concurrency
            ]
            await measure.run_rounds(
                client,
                [
                    [
                        (arms[arm], job)
                        for arm, job in jobs(
                            clients, settings.turns_for(clients), settings.max_tokens
                        ).items()
                    ]
                    for clients, arms in rows
                ],
                settings.rounds,
            )
    return rows, time.perf_counter() - started


def _ttft_ms(arm: measure.ArmResult) -> float:
    return statistics.median(
        statistics.median(run.ttft_s) * 1000 if run.ttft_s else float("nan") for run in arm.runs
    )


def format_report(
    rows: Sequence[tuple[int, dict[str, measure.ArmResult]]],
    settings: measure.RunSettings,
    s: float,
) -> str:
    lines = [
        "The HTTP edge against the gRPC API: one gateway (full pipeline, FakeBackend), the same "
        "turns, in one run",
        f"{settings.max_tokens} tokens per turn; medians of {settings.rounds} interleaved "
        f"rounds; {s:.0f} s in all",
        "",
        f"{'streams':>7} {'arm':<5} {'tok/s':>7} {'x grpc':>7} {'TTFT p50':>9} {'+TTFT':>8} "
        f"{'us/token':>9} {'+us':>6} {'errors':>6}",
    ]
    for clients, arms in rows:
        grpc_arm = arms["grpc"]
        for name, arm in arms.items():
            http = name == "http"
            ratio = measure.format_ratio(measure.ratio(arm, grpc_arm)) if http else ""
            added = _ttft_ms(arm) - _ttft_ms(grpc_arm)
            extra = arm.cpu_us_per_token - grpc_arm.cpu_us_per_token
            lines.append(
                f"{clients:>7} {name:<5} {arm.tokens_per_s:>7.0f} {ratio:>7} "
                f"{_ttft_ms(arm):>7.2f}ms {f'{added:+.2f}ms' if http else '':>8} "
                f"{arm.cpu_us_per_token:>9.1f} {f'{extra:+.1f}' if http else '':>6} "
                f"{arm.failed_turns:>6}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the report; exit 1 if any turn failed."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_edge", description=__doc__.splitlines()[0]
    )
    measure.add_run_options(parser, quick="a short run (about 20 s on 2 cores)")
    args = parser.parse_args(argv)
    settings = measure.settings_from_args(args, DEFAULT, QUICK)
    configure_logging(LoggingConfig(level="warning"))
    rows, seconds = asyncio.run(measure_edge(settings))
    print(format_report(rows, settings, seconds))
    failed = sum(arm.failed_turns for _, arms in rows for arm in arms.values())
    if failed:
        print(f"{failed} turns failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
