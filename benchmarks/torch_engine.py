"""The torch engine through the whole server, against transformers ``generate()``, in one run.

Two measurements on the same model (SmolLM2-135M-Instruct from the bundled GGUF,
the configured dtype) and the same prompt:

* **generate()**: transformers' own ``model.generate`` in this process, greedy,
  ``max_tokens`` new tokens for a batch of 1 and a batch of the most streams
  (the same prompt repeated), timed end to end: the baseline;
* **server**: ``tokenwire serve``'s stack in this process (``running_server``
  over the torch engine, continuous batching by default; ``--forward
  transformers`` for the one-sequence-per-step path), driven by the load
  generator in its own process at each concurrency: tokens/s as the client
  counts them, TTFT p50 and p99.

Each row's ratio is the server's aggregate tokens/s over ``generate()``'s at
batch 1 (one stream) or at the batch of the same size.

    python -m benchmarks.torch_engine                       # about 3 minutes on 2 cores
    python -m benchmarks.torch_engine --concurrency 1,8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks import measure
from benchmarks.loadgen import DEFAULT_PROMPT, LoadJob, LoadResult
from tokenwire.backend import BackendConfig
from tokenwire.config import LimitsConfig, LoggingConfig
from tokenwire.logs import configure_logging
from tokenwire.testing import BorrowedEngine, config_for_tests, running_server

__all__ = ["main", "measure_engine"]


@dataclass(slots=True)
class EngineReport:
    """What one run measured."""

    forward: str
    max_tokens: int
    weights: str = ""  # the format the engine ran (weights=auto resolved)
    generate_tok_s: dict[int, float] = field(default_factory=dict)  # batch → tokens/s
    server: dict[int, LoadResult] = field(default_factory=dict)  # streams → the load's result
    second_turn_ttft_ms: dict[str, float] = field(default_factory=dict)  # cache on/off → TTFT
    elapsed_s: float = 0.0

    def ratio(self, streams: int) -> float:
        """The server's tokens/s at ``streams`` over generate()'s at that batch size."""
        base = self.generate_tok_s.get(streams) or self.generate_tok_s.get(1, 0.0)
        return self.server[streams].tokens_per_s / base if base else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "forward": self.forward,
            "weights": self.weights,
            "max_tokens": self.max_tokens,
            "generate_tokens_per_s": self.generate_tok_s,
            "server": {str(k): v.summary() for k, v in self.server.items()},
            "ratios": {str(k): round(self.ratio(k), 3) for k in self.server},
            "second_turn_ttft_ms": self.second_turn_ttft_ms,
            "elapsed_s": round(self.elapsed_s, 1),
        }


def _generate_rate(model: Any, prompt_ids: list[int], batch: int, max_tokens: int) -> float:
    """transformers generate(): new tokens per second for ``batch`` copies of the prompt."""
    import torch

    inputs = torch.tensor([prompt_ids] * batch)
    with torch.inference_mode():
        model.generate(inputs, max_new_tokens=2, do_sample=False)  # warm
        began = time.perf_counter()
        model.generate(
            inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
        )
    return batch * max_tokens / (time.perf_counter() - began)


async def measure_engine(
    concurrency: Sequence[int],
    max_tokens: int,
    turns: int,
    forward: str,
    options: dict[str, str] | None = None,
) -> EngineReport:
    """generate() at batch 1 and at the most streams, then the server at each concurrency;
    ``options`` are more torch backend options (weights, compile, ...)."""
    from tokenwire_torch import TorchEngine

    started = time.perf_counter()
    most = max(concurrency)
    settings = {**(options or {}), "forward": forward}
    engine = TorchEngine(BackendConfig(device="cpu", max_running=max(most, 1), options=settings))
    await engine.start()
    weights = engine.weights or "transformers"
    if engine.weights in ("int8", "int4"):
        weights += f", dense {engine.dense_weights}"
    report = EngineReport(forward, max_tokens, weights=weights)
    try:
        limits = LimitsConfig(default_max_tokens=max_tokens)
        async with (
            running_server(BorrowedEngine(engine), config_for_tests(limits=limits)) as running,
            measure.load_client(True) as client,
        ):
            prompt_ids = list(
                running.server.model.prepare(  # the exact prompt the server sends the engine
                    _messages(DEFAULT_PROMPT), _params(max_tokens)
                ).prompt_token_ids
            )
            for batch in sorted({1, *concurrency}):
                report.generate_tok_s[batch] = await asyncio.to_thread(
                    _generate_rate, engine.model, prompt_ids, batch, max_tokens
                )
            await client.run(LoadJob(running.address, 1, 1, 4))  # warm the server path
            for streams in concurrency:
                report.server[streams] = await client.run(
                    LoadJob(running.address, streams, turns, max_tokens)
                )
    finally:
        await engine.close()
    if forward != "transformers":
        for cache in ("on", "off"):
            report.second_turn_ttft_ms[cache] = await _second_turn_ttft(
                {**settings, "prefix_cache": cache}, max_tokens
            )
    report.elapsed_s = time.perf_counter() - started
    return report


_HISTORY = " ".join(
    f"Note {i}: the lighthouse keeper logged the weather and the ships." for i in range(24)
)


async def _second_turn_ttft(options: dict[str, str], max_tokens: int) -> float:
    """TTFT of a conversation's second turn (a long first message, then a short one),
    median of 3 conversations, with the engine's prefix cache on or off."""
    from tokenwire.proto.v1 import chat_pb2
    from tokenwire_torch import TorchEngine

    engine = TorchEngine(BackendConfig(device="cpu", max_running=2, options=options))
    await engine.start()
    samples = []
    try:
        async with running_server(BorrowedEngine(engine), config_for_tests()) as running:
            for _ in range(3):
                first = chat_pb2.CompleteRequest(
                    message=_HISTORY, params=chat_pb2.SamplingParams(max_tokens=max_tokens)
                )
                events = [e async for e in running.chat.Complete(first)]
                second = chat_pb2.CompleteRequest(
                    message="Summarize that in one line.",
                    conversation_id=events[0].started.conversation_id,
                    params=chat_pb2.SamplingParams(max_tokens=max_tokens),
                )
                finished = [e async for e in running.chat.Complete(second)][-1]
                samples.append(finished.finished.usage.time_to_first_token_ms)
    finally:
        await engine.close()
    return sorted(samples)[1]


def _messages(text: str) -> list[Any]:
    from tokenwire.backend import ChatMessage

    return [ChatMessage("user", text)]


def _params(max_tokens: int) -> Any:
    from tokenwire.model.frontend import TurnParams

    return TurnParams(max_tokens=max_tokens)


def format_report(report: EngineReport) -> str:
    lines = [
        f"Torch engine through the server (forward: {report.forward}, weights: "
        f"{report.weights}) vs transformers "
        f"generate(), {report.max_tokens} tokens per turn, greedy; {report.elapsed_s:.0f} s",
        "generate(): "
        + ", ".join(f"batch {b}: {r:.1f} tok/s" for b, r in sorted(report.generate_tok_s.items())),
        "",
        f"{'streams':>7} {'tok/s':>8} {'x generate()':>12} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'errors':>6}",
    ]
    for streams, result in sorted(report.server.items()):
        lines.append(
            f"{streams:>7} {result.tokens_per_s:>8.1f} "
            f"{measure.format_ratio(report.ratio(streams)):>12} {result.ttft_p50_ms:>9.1f} "
            f"{result.ttft_p99_ms:>9.1f} {result.itl_p50_ms:>8.1f} {result.failed_turns:>6}"
        )
    if report.second_turn_ttft_ms:
        on, off = report.second_turn_ttft_ms["on"], report.second_turn_ttft_ms["off"]
        lines += [
            "",
            f"second turn of a conversation (a ~600-token first message), TTFT p50: "
            f"prefix cache on {on:.0f} ms, off {off:.0f} ms ({off / on:.1f}x sooner)",
        ]
    lines += [
        "",
        "x generate(): the server's aggregate tokens/s over generate()'s at the same batch",
        "size (at 1 stream, batch 1). TTFT and ITL (inter-token latency) in ms, client-side.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.torch_engine", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--concurrency", type=measure.parse_counts, default=(1, 8, 32))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=2, help="turns per client")
    parser.add_argument("--forward", default="auto", choices=("auto", "own", "transformers"))
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a torch backend option (weights=int8, num_threads=1, compile=on, ...); repeatable",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(LoggingConfig(level="error"))
    options = dict(item.partition("=")[::2] for item in args.option)
    report = asyncio.run(
        measure_engine(args.concurrency, args.max_tokens, args.turns, args.forward, options)
    )
    print(json.dumps(report.summary(), indent=2) if args.json else format_report(report))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 1 if any(r.failed_turns for r in report.server.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
