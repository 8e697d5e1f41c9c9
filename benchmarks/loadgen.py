"""A load generator: N concurrent streaming clients against a running Tokenwire server.

Each client runs ``turns`` Complete calls one after another (every turn starts a
new conversation) and the generator measures, per turn, the time to first token
(request sent → first Delta), the inter-token latency (the gap before each Delta
divided by its ``token_count``, once per token, so coalesced deltas weigh as
many tokens as they carry), the tokens of the answer, and failures by status code.
By default a client starts its next turn when the last ends (the server runs
saturated); ``--turns-per-s`` paces turn starts at a fixed offered load instead.

    python -m benchmarks.loadgen --target 127.0.0.1:50051 --clients 1,16,64 --turns 10

As a library::

    result = await run_load("127.0.0.1:50051", clients=16, turns=10, max_tokens=128)
    print(format_table([result]))
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from benchmarks.measure import finite, parse_counts
from tokenwire.auth.bootstrap import read_key_file
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc

__all__ = [
    "LoadJob",
    "LoadResult",
    "format_table",
    "main",
    "percentile",
    "run_load",
]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_PROMPT = "Tell me a story about a lighthouse keeper."
DEFAULT_KEY_FILE = ".tokenwire/admin.key"
# One channel means one HTTP/2 connection for all clients; "per-client" opens one
# connection each (a local subchannel pool, or gRPC would share the connection).
CHANNEL_MODES = ("shared", "per-client")


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ``samples``; NaN if empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(slots=True)
class LoadResult:
    """What one load run measured. Times are seconds in the samples, ms in the properties."""

    clients: int
    turns: int  # turns asked for, per client
    max_tokens: int
    elapsed_s: float = 0.0  # first request sent → last stream ended
    completed_turns: int = 0
    tokens: int = 0  # sum of Delta.token_count over every turn, failed ones included
    messages: int = 0  # every streamed message: TurnStarted, Delta and TurnFinished
    deltas: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # status code name → failed turns
    ttft_s: list[float] = field(default_factory=list, repr=False)  # one per turn with a Delta
    itl_s: list[float] = field(default_factory=list, repr=False)  # per token after the 1st Delta
    tokens_per_turn: list[int] = field(default_factory=list, repr=False)  # completed turns only

    @property
    def failed_turns(self) -> int:
        """Turns that ended with a non-OK status."""
        return sum(self.errors.values())

    @property
    def tokens_per_s(self) -> float:
        """Aggregate completion tokens per second over all clients."""
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def messages_per_s(self) -> float:
        """Aggregate streamed messages per second over all clients."""
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def turns_per_s(self) -> float:
        """Completed turns per second over all clients."""
        return self.completed_turns / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ttft_p50_ms(self) -> float:
        return percentile(self.ttft_s, 50) * 1000

    @property
    def ttft_p99_ms(self) -> float:
        return percentile(self.ttft_s, 99) * 1000

    @property
    def itl_p50_ms(self) -> float:
        return percentile(self.itl_s, 50) * 1000

    @property
    def itl_p99_ms(self) -> float:
        return percentile(self.itl_s, 99) * 1000

    def summary(self) -> dict[str, Any]:
        """The figures as plain JSON-ready values (no raw samples)."""
        return {
            "clients": self.clients,
            "turns_per_client": self.turns,
            "max_tokens": self.max_tokens,
            "completed_turns": self.completed_turns,
            "failed_turns": self.failed_turns,
            "errors": dict(self.errors),
            "elapsed_s": round(self.elapsed_s, 4),
            "tokens": self.tokens,
            "messages": self.messages,
            "deltas": self.deltas,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "messages_per_s": round(self.messages_per_s, 1),
            "ttft_p50_ms": finite(self.ttft_p50_ms, 3),
            "ttft_p99_ms": finite(self.ttft_p99_ms, 3),
            "itl_p50_ms": finite(self.itl_p50_ms, 3),
            "itl_p99_ms": finite(self.itl_p99_ms, 3),
        }


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def format_table(results: Sequence[LoadResult]) -> str:
    """A fixed-width table, one row per run."""
    header = (
        f"{'clients':>7} {'turns':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
        f"{'ITL p99':>8} {'tokens/s':>10} {'msgs/s':>10} {'errors':>7}"
    )
    units = f"{'':>7} {'':>7} {'ms':>9} {'ms':>9} {'ms':>8} {'ms':>8} {'':>10} {'':>10} {'':>7}"
    lines = [header, units]
    for r in results:
        lines.append(
            f"{r.clients:>7} {r.completed_turns:>7} {_ms(r.ttft_p50_ms):>9} "
            f"{_ms(r.ttft_p99_ms):>9} {_ms(r.itl_p50_ms):>8} {_ms(r.itl_p99_ms):>8} "
            f"{r.tokens_per_s:>10.0f} {r.messages_per_s:>10.0f} {r.failed_turns:>7}"
        )
    codes = Counter[str]()
    for r in results:
        codes.update(r.errors)
    if codes:
        lines.append("errors by status: " + ", ".join(f"{k}={v}" for k, v in sorted(codes.items())))
    return "\n".join(lines)


async def _client(
    stub: chat_pb2_grpc.ChatServiceAsyncStub,
    base: chat_pb2.CompleteRequest,
    turns: int,
    timeout_s: float | None,
    metadata: tuple[tuple[str, str], ...] | None,
    result: LoadResult,
    errors: Counter[str],
    schedule: Callable[[int], float] | None = None,
    continue_conversation: bool = False,
) -> None:
    # The hot loop: keep per-message work small, the client shares the CPU it measures.
    clock = time.perf_counter
    ttft = result.ttft_s
    itl = result.itl_s
    conversation_id = ""
    for turn in range(turns):
        if continue_conversation and conversation_id:
            request = chat_pb2.CompleteRequest()
            request.CopyFrom(base)
            request.conversation_id = conversation_id
        else:
            request = base
        if schedule is not None:  # paced: start this turn at its time, or now if late
            wait = schedule(turn) - clock()
            if wait > 0:
                await asyncio.sleep(wait)
        tokens = messages = deltas = 0
        sent = clock()
        last = 0.0
        call = stub.Complete(request, timeout=timeout_s, metadata=metadata)
        try:
            async for response in call:
                messages += 1
                if not response.HasField("delta"):
                    if continue_conversation and response.HasField("started"):
                        conversation_id = response.started.conversation_id
                    continue
                now = clock()
                count = response.delta.token_count
                if deltas == 0:
                    ttft.append(now - sent)
                elif count > 0:
                    itl.extend([(now - last) / count] * count)
                last = now
                deltas += 1
                tokens += count
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1
        else:
            result.completed_turns += 1
            result.tokens_per_turn.append(tokens)
        result.tokens += tokens
        result.messages += messages
        result.deltas += deltas


def _open_channel(target: str, own_connection: bool) -> grpc.aio.Channel:
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    return grpc.aio.insecure_channel(target, options=options)


async def run_load(
    target: str,
    clients: int,
    turns: int,
    max_tokens: int,
    prompt: str = DEFAULT_PROMPT,
    *,
    temperature: float = 0.0,
    channel_mode: str = "shared",
    model: str = "",
    timeout_s: float | None = None,
    connect_timeout_s: float = 10.0,
    api_key: str = "",
    turns_per_s: float = 0.0,
    continue_conversations: bool = False,
) -> LoadResult:
    """Run ``clients`` concurrent clients, ``turns`` Complete calls each, against ``target``.

    By default each client starts its next turn as soon as the last one ends (a
    closed loop: the server runs saturated). ``turns_per_s > 0`` paces them
    instead: turn ``k`` of client ``i`` starts at ``(k * clients + i) / turns_per_s``
    seconds after the first (at once when that client is still busy), so the
    offered load is the same whatever the server's speed, and TTFT measures the
    latency the server adds at that load rather than its queue.
    ``continue_conversations``: each client's turns after its first continue the
    conversation its first started (history read, one turn at a time), instead of
    each starting a new one.

    Channels connect before the clock starts, so ``elapsed_s`` covers streaming only;
    TimeoutError if they cannot connect within ``connect_timeout_s``. A turn that
    ends with a non-OK status is counted under its code, not raised. A non-empty
    ``api_key`` is sent with every call as ``authorization: Bearer <key>``.
    """
    if clients < 1 or turns < 1 or max_tokens < 0 or turns_per_s < 0:
        raise ValueError("clients and turns must be >= 1, max_tokens and turns_per_s >= 0")
    if channel_mode not in CHANNEL_MODES:
        raise ValueError(f"channel_mode must be one of {CHANNEL_MODES}, got {channel_mode!r}")
    count = 1 if channel_mode == "shared" else clients
    channels = [_open_channel(target, channel_mode != "shared") for _ in range(count)]
    result = LoadResult(clients=clients, turns=turns, max_tokens=max_tokens)
    errors = Counter[str]()
    try:
        ready = asyncio.gather(*(c.channel_ready() for c in channels))
        try:
            await asyncio.wait_for(ready, connect_timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"cannot connect to {target} within {connect_timeout_s} s; is a server running?"
            ) from None
        stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
        request = chat_pb2.CompleteRequest(
            message=prompt,
            model=model,
            params=chat_pb2.SamplingParams(temperature=temperature, max_tokens=max_tokens),
        )
        metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        start = time.perf_counter()

        def paced(i: int) -> Callable[[int], float] | None:
            if not turns_per_s:
                return None
            return lambda k: start + (k * clients + i) / turns_per_s

        await asyncio.gather(
            *(
                _client(
                    stubs[i % count],
                    request,
                    turns,
                    timeout_s,
                    metadata,
                    result,
                    errors,
                    paced(i),
                    continue_conversations,
                )
                for i in range(clients)
            )
        )
        result.elapsed_s = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close(None) for c in channels))
    result.errors = dict(errors)
    return result


@dataclass(frozen=True, slots=True)
class LoadJob:
    """The arguments of one :func:`run_load`, to send to a client in another process."""

    target: str
    clients: int
    turns: int
    max_tokens: int
    prompt: str = DEFAULT_PROMPT
    api_key: str = ""
    turns_per_s: float = 0.0  # 0: closed loop (saturated); else paced at this offered load
    continue_conversations: bool = False  # each client continues its own conversation

    async def run(self) -> LoadResult:
        """Run this load here."""
        return await run_load(
            self.target,
            self.clients,
            self.turns,
            self.max_tokens,
            self.prompt,
            api_key=self.api_key,
            turns_per_s=self.turns_per_s,
            continue_conversations=self.continue_conversations,
        )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.loadgen``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen", description=__doc__.splitlines()[0]
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help="HOST:PORT of a running server")
    p.add_argument(
        "--clients",
        type=parse_counts,
        default=(8,),
        metavar="N[,N...]",
        help="concurrent clients; a list runs once per value, one table row each",
    )
    p.add_argument("--turns", type=int, default=10, help="Complete calls per client")
    p.add_argument("--max-tokens", type=int, default=128, help="SamplingParams.max_tokens")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message of every turn")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    p.add_argument("--model", default="", help="model name; empty: the server's default")
    p.add_argument(
        "--channel",
        choices=CHANNEL_MODES,
        default="shared",
        help="one connection for all clients, or one each",
    )
    p.add_argument("--timeout-s", type=float, default=None, help="deadline of each call")
    p.add_argument(
        "--turns-per-s",
        type=float,
        default=0.0,
        help="pace turn starts at this offered load (open loop); 0: each client starts its "
        "next turn when the last ends (default)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TOKENWIRE_API_KEY") or read_key_file(DEFAULT_KEY_FILE) or "",
        help="API key sent as a bearer token (default: $TOKENWIRE_API_KEY, else the key "
        f"`tokenwire serve` wrote to {DEFAULT_KEY_FILE}); empty: none",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    return p


async def _run(args: argparse.Namespace) -> list[LoadResult]:
    results = []
    for clients in args.clients:
        results.append(
            await run_load(
                args.target,
                clients,
                args.turns,
                args.max_tokens,
                args.prompt,
                temperature=args.temperature,
                channel_mode=args.channel,
                model=args.model,
                timeout_s=args.timeout_s,
                api_key=args.api_key,
                turns_per_s=args.turns_per_s,
            )
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load and print the table (or JSON); exit 1 if any turn failed."""
    args = build_parser().parse_args(argv)
    if args.turns < 1 or args.max_tokens < 0 or args.turns_per_s < 0:
        print("--turns must be >= 1, --max-tokens and --turns-per-s >= 0", file=sys.stderr)
        return 2
    try:
        results = asyncio.run(_run(args))
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.json:
        report = {
            "target": args.target,
            "channel": args.channel,
            "prompt_chars": len(args.prompt),
            "results": [r.summary() for r in results],
        }
        print(json.dumps(report, indent=2))
    else:
        print(
            f"target {args.target}, {args.channel} channel, max_tokens {args.max_tokens}, "
            f"temperature {args.temperature}"
        )
        print(format_table(results))
    return 1 if any(r.failed_turns for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
