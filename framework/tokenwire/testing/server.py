"""Run a real Tokenwire server in-process on port 0, for tests and benchmarks.

async with running_server(FakeBackend()) as running:
    async for event in running.chat.Complete(CompleteRequest(message="Hi")):
        ...
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from tokenwire.backend import Backend, Capabilities, Chunk, Engine, GenerateRequest, LoadReport
from tokenwire.config import Config
from tokenwire.interceptors import Interceptor
from tokenwire.live import LiveBus
from tokenwire.proto.v1 import chat_pb2_grpc, conversations_pb2_grpc, models_pb2_grpc
from tokenwire.server import TokenwireServer
from tokenwire.stores.conversations import ConversationStore
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.tracing.spans import Tracing
from tokenwire.turns.policy import TurnPolicy
from tokenwire.worker.config import WorkerConfig
from tokenwire.worker.server import WorkerServer

if TYPE_CHECKING:  # typed async stubs exist only in the .pyi files
    from tokenwire.proto.v1.chat_pb2_grpc import ChatServiceAsyncStub
    from tokenwire.proto.v1.conversations_pb2_grpc import ConversationServiceAsyncStub
    from tokenwire.proto.v1.models_pb2_grpc import ModelServiceAsyncStub

__all__ = [
    "BorrowedEngine",
    "RunningServer",
    "config_for_tests",
    "running_server",
    "running_worker",
]


def config_for_tests(**sections: Any) -> Config:
    """A config on 127.0.0.1:0 with an in-memory store, a fresh data folder and auth off.

    Moderation runs the rules alone (no model to load per server); pass
    ``moderation=ModerationConfig(...)`` for the model-based moderators. Pass
    sections to replace, e.g. ``limits=LimitsConfig(...)``.
    """
    config = Config()
    config = dataclasses.replace(
        config,
        auth=dataclasses.replace(config.auth, enabled=False),
        server=dataclasses.replace(config.server, listen="127.0.0.1:0", grace_period_s=5.0),
        store=dataclasses.replace(
            config.store,
            sqlite_path=":memory:",
            data_dir=tempfile.mkdtemp(prefix="tokenwire-test-"),
        ),
        moderation=dataclasses.replace(config.moderation, moderator="rules"),
    )
    return dataclasses.replace(config, **sections)


class BorrowedEngine:
    """Lends a started engine to a server that must not start or close it.

    Tests load a real model once per session and serve it from many servers.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def capabilities(self) -> Capabilities:
        return self.engine.capabilities

    async def start(self) -> None:
        """Nothing: the owner started the engine."""

    async def close(self) -> None:
        """Nothing: the owner closes the engine."""

    def load(self) -> LoadReport:
        return self.engine.load()

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self.engine.generate(request)


@dataclass(slots=True)
class RunningServer:
    """A started server and a client channel to it."""

    server: TokenwireServer
    channel: grpc.aio.Channel
    chat: ChatServiceAsyncStub
    models: ModelServiceAsyncStub
    conversations: ConversationServiceAsyncStub

    @property
    def address(self) -> str:
        return self.server.address


@asynccontextmanager
async def running_server(
    backend: Backend,
    config: Config | None = None,
    *,
    store: ConversationStore | None = None,
    live: LiveBus | None = None,
    interceptors: Sequence[Interceptor] | None = None,
    policies: Sequence[TurnPolicy] | None = None,
    tracing: Tracing | None = None,
) -> AsyncIterator[RunningServer]:
    """Start a server around ``backend`` on a free port; stop it (grace 0) on exit.

    ``interceptors`` and ``policies`` replace the ones ``config`` declares (see
    :mod:`tokenwire.pipeline`); ``tracing`` replaces the OTLP export of spans.
    """
    config = config or config_for_tests()
    server = TokenwireServer(
        config,
        backend=backend,
        store=store or SQLiteConversationStore(":memory:"),
        live=live,
        interceptors=interceptors,
        policies=policies,
        tracing=tracing,
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield RunningServer(
            server,
            channel,
            chat_pb2_grpc.ChatServiceStub(channel),
            models_pb2_grpc.ModelServiceStub(channel),
            conversations_pb2_grpc.ConversationServiceStub(channel),
        )
    finally:
        await channel.close(None)
        await server.stop(0)


@asynccontextmanager
async def running_worker(
    engine: Engine, config: Config | None = None, **worker: Any
) -> AsyncIterator[WorkerServer]:
    """Start a worker around ``engine`` on a free port; stop it (grace 0) on exit.

    Keyword arguments set ``[worker]`` fields, e.g. ``token="s3cret"``.
    """
    config = config or config_for_tests()
    settings = {"listen": "127.0.0.1:0", **worker}
    config = dataclasses.replace(config, worker=dataclasses.replace(WorkerConfig(), **settings))
    server = WorkerServer(config, engine=engine)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)
