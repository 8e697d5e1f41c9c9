"""The own Llama forward's decode step, attention in the cache's dtype against float32.

The bundled model (SmolLM2-135M-Instruct from the GGUF) in the engine's default
formats here (int4 one-row steps beside a dense copy; bf16 where the CPU runs it
natively), one ``LlamaForward`` per arm in one process: decode steps of 1, 8 and
32 rows at a short and a long context, the arms interleaved round by round, the
median of each. Without native bf16 the cache is float32 and the arms are one.

    python -m benchmarks.torch_forward                 # about a minute on 2 cores
    python -m benchmarks.torch_forward --rows 1,8 --contexts 64,1000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import measure

__all__ = ["main", "measure_steps"]


def _load() -> Any:
    """The bundled model, loaded as the torch engine loads it."""
    from tokenwire.backend import BackendConfig
    from tokenwire_torch._runner import ModelRunner
    from tokenwire_torch.source import resolve_model_source

    return ModelRunner.load(resolve_model_source(BackendConfig()), "cpu", "float32").model


def measure_steps(
    rows: Sequence[int], contexts: Sequence[int], rounds: int, steps: int, model: Any = None
) -> dict[str, Any]:
    """Median ms per decode step, per arm (attention dtype), rows and context."""
    import torch

    from tokenwire_torch.llama import LlamaForward, cpu_has_avx2, cpu_has_bf16

    model = model if model is not None else _load()
    dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    weights = "int4" if cpu_has_bf16() or cpu_has_avx2() else "float"
    most, longest = max(rows), max(contexts) + (steps + 1) * rounds + 1
    arms = {str(d).removeprefix("torch."): d for d in (dtype, torch.float32)}
    forwards = {
        name: LlamaForward(
            model, slots=most, max_len=longest, dtype=dtype, weights=weights, attention_dtype=d
        )
        for name, d in arms.items()
    }
    times: dict[str, dict[str, list[float]]] = {name: {} for name in forwards}
    for context in contexts:
        for count in rows:
            slots = list(range(count))
            for llama in forwards.values():  # prefill every slot to the context
                llama.forward(slots, [[7] * context] * count, [0] * count)
            position = context
            for _ in range(rounds):
                for name, llama in forwards.items():
                    llama.forward(slots, [[9]] * count, [position] * count)  # warm
                    began = time.perf_counter()
                    for step in range(steps):
                        llama.forward(slots, [[9]] * count, [position + 1 + step] * count)
                    elapsed = (time.perf_counter() - began) / steps * 1000
                    times[name].setdefault(f"{count}x{context}", []).append(elapsed)
                position += steps + 1
    return {
        "weights": weights,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "ms_per_step": {
            name: {key: round(statistics.median(v), 2) for key, v in cells.items()}
            for name, cells in times.items()
        },
    }


def format_report(report: dict[str, Any]) -> str:
    arms = list(report["ms_per_step"])
    lines = [
        f"Own forward, one decode step (weights {report['weights']}, cache "
        f"{report['dtype']}, {report['threads']} threads), ms, medians; attention in:",
        f"{'rows':>5} {'context':>8} "
        + " ".join(f"{a:>9}" for a in arms)
        + ("   speed-up" if len(arms) > 1 else ""),
    ]
    for key in report["ms_per_step"][arms[0]]:
        count, context = key.split("x")
        cells = [report["ms_per_step"][a][key] for a in arms]
        line = f"{count:>5} {context:>8} " + " ".join(f"{c:>9.2f}" for c in cells)
        if len(arms) > 1:
            line += f"   {cells[0] / cells[1]:>7.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_forward")
    parser.add_argument("--rows", type=measure.parse_counts, default=(1, 8, 32))
    parser.add_argument("--contexts", type=measure.parse_counts, default=(64, 500))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = measure_steps(args.rows, args.contexts, args.rounds, args.steps)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
