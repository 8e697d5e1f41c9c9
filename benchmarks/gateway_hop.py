"""What the gateway adds in front of a worker: the same streams direct and through it.

One worker process (``tokenwire worker`` with the fake engine, one token every
``--token-ms``) serves two arms, measured in the same run with their rounds
interleaved:

* **direct**: clients call the worker's ``VllmEngine.Generate`` with token ids, as
  a router of another project would;
* **gateway**: clients call ``ChatService.Complete`` on a gateway (this process)
  with the full pipeline on (API keys, quotas, moderation of input and output, the
  SQLite conversation store) that routes to that worker.

``--streams`` clients run at once, each ``--turns`` turns of ``--tokens`` tokens one
after another; the clients run in a process of their own. Printed: TTFT p50 and
p99 per arm, what the gateway adds to them, and its throughput against direct.

    PYTHONPATH=framework:backends python -m benchmarks.gateway_hop
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.servers import full_chain_config, full_chain_server, issue_key
from tokenwire.config import LoggingConfig
from tokenwire.logs import configure_logging
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine

PROMPT_TOKENS = 40  # about what the gateway's template makes of a short message


@dataclass
class Round:
    ttfts: list[float]
    tokens: int
    seconds: float


@dataclass
class Arm:
    name: str
    rounds: list[Round] = field(default_factory=list)

    def ttft(self, q: float) -> float:
        """Median over rounds of each round's TTFT quantile ``q``, in ms."""
        return statistics.median(_quantile(r.ttfts, q) for r in self.rounds) * 1000

    def tokens_per_s(self) -> float:
        return statistics.median(r.tokens / r.seconds for r in self.rounds)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the clients (in their own process) --------------------------------------------


async def _direct(address: str, streams: int, turns: int, tokens: int) -> Round:
    from smg_grpc_proto import vllm_engine_pb2 as pb
    from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

    ttfts: list[float] = []
    received = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.VllmEngineStub(channel)

        async def client(index: int) -> None:
            nonlocal received
            for turn in range(turns):
                request = pb.GenerateRequest(
                    request_id=f"{index}-{turn}-{time.monotonic_ns()}",
                    tokenized=pb.TokenizedInput(input_ids=[72] * PROMPT_TOKENS),
                    sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=tokens),
                    stream=True,
                )
                started = time.perf_counter()
                first = True
                async for response in stub.Generate(request):
                    if response.HasField("chunk") and response.chunk.token_ids:
                        if first:
                            ttfts.append(time.perf_counter() - started)
                            first = False
                        received += len(response.chunk.token_ids)

        began = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(streams)))
        return Round(ttfts, received, time.perf_counter() - began)


async def _gateway(address: str, key: str, streams: int, turns: int, tokens: int) -> Round:
    from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc

    ttfts: list[float] = []
    received = 0
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def client() -> None:
            nonlocal received
            for _ in range(turns):
                request = chat_pb2.CompleteRequest(
                    message="Hi", params=chat_pb2.SamplingParams(max_tokens=tokens)
                )
                started = time.perf_counter()
                first = True
                async for event in stub.Complete(request, metadata=metadata):
                    if event.HasField("delta"):
                        if first:
                            ttfts.append(time.perf_counter() - started)
                            first = False
                        received += event.delta.token_count

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(streams)))
        return Round(ttfts, received, time.perf_counter() - began)


def _client_round(
    kind: str, address: str, key: str, streams: int, turns: int, tokens: int
) -> Round:
    if kind == "direct":
        return asyncio.run(_direct(address, streams, turns, tokens))
    return asyncio.run(_gateway(address, key, streams, turns, tokens))


# --- the servers ---------------------------------------------------------------------


@contextlib.contextmanager
def worker_process(token_ms: float, streams: int, interval_ms: float = 0.0) -> Iterator[str]:
    """A ``tokenwire worker`` with the fake engine, endless, one token every ``token_ms``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    # A reply whose words start no moderation term: the output screen releases each token
    # as it comes (a word that could grow into a term is held until it cannot).
    options = f"reply=Tokens are cheap. ,endless=true,token_delay_s={token_ms / 1000}"
    command = [sys.executable, "-m", "tokenwire", "worker", "--backend", "fake"]
    command += ["--listen", address, "--set", f"backend.options={options}"]
    command += ["--set", f"backend.max_running={streams * 4}", "--set", "logging.level=warning"]
    command += ["--set", f"worker.message_interval_ms={interval_ms}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield address
    finally:
        process.terminate()
        process.wait(30)


async def _wait_serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the worker at {address} did not start")


async def measure(
    *,
    streams: int,
    turns: int,
    tokens: int,
    token_ms: float,
    rounds: int,
    interval_ms: float = 0.0,
    gateway_interval_ms: float | None = None,
) -> tuple[Arm, Arm]:
    direct, gateway = Arm("direct"), Arm("gateway")
    context = multiprocessing.get_context("spawn")
    with (
        worker_process(token_ms, streams, interval_ms) as worker,
        tempfile.TemporaryDirectory() as data_dir,
        concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as clients,
    ):
        await _wait_serving(worker)
        router = RouterConfig(workers=worker)
        if gateway_interval_ms is not None:
            router = dataclasses.replace(router, message_interval_ms=gateway_interval_ms)
        config = full_chain_config(data_dir)
        config = dataclasses.replace(config, router=router)
        async with full_chain_server(RoutedEngine(router), config) as running:  # type: ignore[arg-type]
            key = await issue_key(running.server.pipeline)
            loop = asyncio.get_running_loop()

            async def run(arm: Arm, record: bool) -> None:
                address = worker if arm is direct else running.address
                result = await loop.run_in_executor(
                    clients, _client_round, arm.name, address, key, streams, turns, tokens
                )
                if record:
                    arm.rounds.append(result)

            for arm in (direct, gateway):  # warm-up: connections, caches, the JIT of habits
                await run(arm, False)
            for i in range(rounds):
                order = (direct, gateway) if i % 2 == 0 else (gateway, direct)
                for arm in order:
                    await run(arm, True)
    return direct, gateway


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=64, help="concurrent clients")
    parser.add_argument("--turns", type=int, default=8, help="turns per client per round")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--token-ms", type=float, default=2.0, help="the engine's token pace")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per arm")
    parser.add_argument(
        "--message-interval-ms",
        type=float,
        default=0.0,
        help="the worker's worker.message_interval_ms (0: each token as soon as it is ready)",
    )
    parser.add_argument(
        "--gateway-interval-ms",
        type=float,
        default=None,
        help="the gateway's router.message_interval_ms (default: the router's default, "
        f"{RouterConfig().message_interval_ms:g})",
    )
    args = parser.parse_args(argv)
    configure_logging(LoggingConfig(level="warning"))
    direct, gateway = asyncio.run(
        measure(
            streams=args.streams,
            turns=args.turns,
            tokens=args.tokens,
            token_ms=args.token_ms,
            rounds=args.rounds,
            interval_ms=args.message_interval_ms,
            gateway_interval_ms=args.gateway_interval_ms,
        )
    )
    gw_interval = (
        RouterConfig().message_interval_ms
        if args.gateway_interval_ms is None
        else args.gateway_interval_ms
    )
    print(
        f"{args.streams} streams x {args.turns} turns of {args.tokens} tokens, one token every "
        f"{args.token_ms} ms; worker messages at least {args.message_interval_ms} ms apart "
        f"(to the gateway: {gw_interval:g} ms); "
        f"medians of {args.rounds} interleaved rounds"
    )
    print(f"{'arm':8} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>9}")
    for arm in (direct, gateway):
        print(
            f"{arm.name:8} {arm.ttft(0.5):7.2f}ms {arm.ttft(0.99):7.2f}ms {arm.tokens_per_s():9.0f}"
        )
    print(
        f"gateway adds TTFT p50 {gateway.ttft(0.5) - direct.ttft(0.5):+.2f} ms, "
        f"p99 {gateway.ttft(0.99) - direct.ttft(0.99):+.2f} ms; "
        f"throughput {gateway.tokens_per_s() / direct.tokens_per_s():.2f}x direct"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
