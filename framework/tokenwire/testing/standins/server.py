"""Run a stand-in engine server in-process on 127.0.0.1:0, for tests and benchmarks.

async with running_standin("trtllm", FakeBackend()) as standin:
    router = RouterConfig(workers=standin.target)   # "trtllm://127.0.0.1:PORT"
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from smg_grpc_proto import sglang_scheduler_pb2_grpc, trtllm_service_pb2_grpc

from tokenwire.backend import Engine
from tokenwire.model.tokenizers import load_tokenizer
from tokenwire.router.targets import PROTOCOLS, worker_key
from tokenwire.testing.standins.common import EngineRunner
from tokenwire.testing.standins.sglang import SglangHealthStandin, SglangStandin
from tokenwire.testing.standins.trtllm import TrtllmStandin

__all__ = ["STANDIN_PROTOCOLS", "RunningStandin", "running_standin"]

STANDIN_PROTOCOLS = ("trtllm", "sglang")


@dataclass(slots=True)
class RunningStandin:
    """A started stand-in: its protocol, port and servicer (``TrtllmStandin`` or
    ``SglangStandin``), whose ``runner`` records aborts, cancels and finishes."""

    protocol: str
    port: int
    servicer: TrtllmStandin | SglangStandin
    server: grpc.aio.Server

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        """The ``router.workers`` entry that reaches it, e.g. ``trtllm://127.0.0.1:PORT``."""
        return worker_key(self.protocol, self.address)

    @property
    def runner(self) -> EngineRunner:
        return self.servicer.runner


@asynccontextmanager
async def running_standin(
    protocol: str, engine: Engine, **options: Any
) -> AsyncIterator[RunningStandin]:
    """Start ``engine`` and a stand-in server for ``protocol`` ("trtllm" or "sglang")
    around it on a free port; stop both (grace 0) on exit. ``options`` go to the
    servicer, e.g. ``serve_tokenizer=False`` or ``health_check_delay_s=0``, except
    ``health_service=False``: an SGLang stand-in without ``grpc.health.v1`` (as older
    releases). The model's EOS ids come from the engine's tokenizer unless
    ``eos_token_ids`` says."""
    if protocol not in STANDIN_PROTOCOLS:
        known = ", ".join(p for p in PROTOCOLS if p in STANDIN_PROTOCOLS)
        raise ValueError(f"no stand-in speaks {protocol!r}; known: {known}")
    health_service = bool(options.pop("health_service", True))
    await engine.start()
    try:
        if "eos_token_ids" not in options and engine.capabilities.tokenizer is not None:
            tokenizer = await asyncio.to_thread(load_tokenizer, engine.capabilities.tokenizer)
            options["eos_token_ids"] = tokenizer.eos_token_ids
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
        servicer: TrtllmStandin | SglangStandin
        if protocol == "trtllm":
            servicer = TrtllmStandin(engine, **options)
            trtllm_service_pb2_grpc.add_TrtllmServiceServicer_to_server(servicer, server)
        else:
            servicer = SglangStandin(engine, **options)
            sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(servicer, server)
            if health_service:
                health = SglangHealthStandin(servicer)
                health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            yield RunningStandin(protocol, port, servicer, server)
        finally:
            await server.stop(0)
    finally:
        await engine.close()
