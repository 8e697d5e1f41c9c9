"""The servers the benchmarks measure, and the engine and API key they use.

* :func:`bench_backend`: the engine, endless and zero-cost, so what is measured
  is the server;
* :func:`bare_server`: the floor, a plain ``grpc.aio`` Complete that sends
  prebuilt one-token messages and does nothing else;
* :func:`full_chain_config` and :func:`full_chain_server`: Tokenwire with
  authentication (API keys), quotas and moderation all on, as the server's own
  pipeline builds them, checked to be complete;
* :func:`issue_key`: the API key every client sends.

    with tempfile.TemporaryDirectory() as data_dir:
        config = full_chain_config(data_dir)
        async with full_chain_server(bench_backend(1, 64), config) as running:
            key = await issue_key(running.server.pipeline)
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tokenwire.abuse.interceptor import SuspensionInterceptor
from tokenwire.abuse.policy import AbusePolicy
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.auth.keys import make_principal
from tokenwire.auth.policy import CredentialPolicy
from tokenwire.config import Config
from tokenwire.interceptors import ErrorsInterceptor
from tokenwire.moderation import ModerationConfig
from tokenwire.moderation.policy import ModerationPolicy
from tokenwire.pipeline import Pipeline
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc
from tokenwire.quotas import PlanLimits, QuotaConfig
from tokenwire.quotas.interceptor import QuotaInterceptor
from tokenwire.quotas.policy import QuotaPolicy
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

__all__ = [
    "FULL_CHAIN",
    "FULL_POLICIES",
    "bare_server",
    "bench_backend",
    "describe_pipeline",
    "full_chain_config",
    "full_chain_server",
    "issue_key",
    "quota_config",
]

# per call, then per turn, in order
FULL_CHAIN = (ErrorsInterceptor, AuthInterceptor, SuspensionInterceptor, QuotaInterceptor)
FULL_POLICIES = (CredentialPolicy, AbusePolicy, QuotaPolicy, ModerationPolicy)

# ASCII only: with the byte tokenizer every token is then one character.
_REPLY = "Once upon a time, a keeper lit the lamp every night. "
_TENANT, _USER, _PLAN = "bench", "bench", "bench"
# Far above any load here (a few hundred turns/s, 64 streams), yet every one is checked.
_PLAN_LIMITS = PlanLimits(
    requests_per_minute=10_000_000, tokens_per_minute=1_000_000_000, concurrent_streams=100_000
)
_Context = grpc.aio.ServicerContext[Any, Any]


def bench_backend(tokens_per_chunk: int, streams: int) -> FakeBackend:
    """An endless engine that costs nothing and always has its next chunk ready,
    with room for ``streams`` (admission is not under test)."""
    return FakeBackend(
        reply=_REPLY,
        endless=True,
        tokens_per_chunk=tokens_per_chunk,
        max_running=max(1024, 2 * streams),
    )


class _BareChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """The floor: Complete streams ``max_tokens`` copies of one prebuilt Delta message."""

    _DELTA = chat_pb2.CompleteResponse(delta=chat_pb2.Delta(text="x", token_count=1))

    async def Complete(
        self, request: chat_pb2.CompleteRequest, context: _Context
    ) -> AsyncIterator[chat_pb2.CompleteResponse]:
        message = self._DELTA
        for _ in range(request.params.max_tokens):
            yield message

    def Converse(
        self, request_iterator: Any, context: _Context
    ) -> AsyncIterator[chat_pb2.ConverseResponse]:
        raise NotImplementedError("the bare floor serves Complete only")


@contextlib.asynccontextmanager
async def bare_server() -> AsyncIterator[str]:
    """A bare grpc.aio ChatService on 127.0.0.1 (Complete only); yields its address.

    It sends one token per message and nothing else: no Python gRPC server can
    send the same tokens for less. It ignores the metadata clients send.
    """
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(_BareChatServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def quota_config(store: str = "memory", redis_url: str = "") -> QuotaConfig:
    """Quotas in ``store`` ("memory" or "redis" at ``redis_url``) with one plan that
    checks every dimension (requests/min, tokens/min, streams) and refuses nothing here."""
    return QuotaConfig(
        store=store,
        redis_url=redis_url or QuotaConfig().redis_url,
        # A prefix of this run's own: no counters left by another run or service.
        key_prefix=f"tokenwire:bench:{uuid.uuid4().hex[:12]}:",
        plans={_PLAN: _PLAN_LIMITS},
        default_plan=_PLAN,
    )


def full_chain_config(
    data_dir: str, quotas: QuotaConfig | None = None, *, coalesce_chunks: int | None = None
) -> Config:
    """A server config with every part on.

    Authentication by API key (a SQLite key store in ``data_dir``, the default
    key cache), ``quotas`` (default: :func:`quota_config` in memory), moderation
    with the built-in rules on input and output. ``coalesce_chunks`` replaces
    ``server.coalesce_chunks``.
    """
    base = config_for_tests()
    server = base.server
    if coalesce_chunks is not None:
        server = dataclasses.replace(server, coalesce_chunks=coalesce_chunks)
    return config_for_tests(
        # No bootstrap admin key: the benchmark makes its own key, and nothing is printed.
        auth=dataclasses.replace(base.auth, enabled=True, api_keys=True, bootstrap_admin_key=False),
        quotas=quotas or quota_config(),
        moderation=ModerationConfig(enabled=True, moderator="rules", input=True, output=True),
        store=dataclasses.replace(base.store, data_dir=data_dir),
        server=server,
    )


@contextlib.asynccontextmanager
async def full_chain_server(backend: FakeBackend, config: Config) -> AsyncIterator[RunningServer]:
    """``running_server`` with the pipeline the server builds from ``config`` itself.

    RuntimeError, before any load, unless that pipeline holds every interceptor
    of :data:`FULL_CHAIN` and every policy of :data:`FULL_POLICIES`.
    """
    async with running_server(backend, config) as running:
        pipeline = running.server.pipeline
        missing = [
            *(
                t.__name__
                for t in FULL_CHAIN
                if not any(isinstance(i, t) for i in pipeline.interceptors)
            ),
            *(
                t.__name__
                for t in FULL_POLICIES
                if not any(isinstance(p, t) for p in pipeline.policies)
            ),
        ]
        if missing:
            raise RuntimeError(f"the server's pipeline lacks {', '.join(missing)}")
        yield running


def describe_pipeline(pipeline: Pipeline) -> str:
    """``"A -> B; per turn: C -> D"``: the chain and the turn policies, by class name."""
    chain = " -> ".join(type(i).__name__ for i in pipeline.interceptors)
    policies = " -> ".join(type(p).__name__ for p in pipeline.policies) or "none"
    return f"{chain}; per turn: {policies}"


async def issue_key(pipeline: Pipeline) -> str:
    """A new API key for the benchmark's principal (on :func:`quota_config`'s plan),
    made through the pipeline's key store; every server whose key store is the
    same file in the same data directory accepts it."""
    auth = pipeline.auth
    if auth is None:
        raise RuntimeError("the pipeline has no AuthInterceptor to make a key with")
    principal = make_principal(_TENANT, _USER, plan=_PLAN)
    issued = await auth.key_store.create_key(principal, description="benchmark")
    return issued.secret
