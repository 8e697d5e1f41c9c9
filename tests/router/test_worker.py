"""A worker serves VllmEngine over an engine, as vLLM's gRPC server does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from tokenwire.testing import FakeBackend, running_worker
from tokenwire.worker.protocol import CACHE_SCOPE_KEY, MESSAGE_INTERVAL_KEY, SHARED_PREFIX_KEY
from tokenwire.worker.server import WorkerServer
from tokenwire.worker.tokenizer_files import unpack_tokenizer


def generate(
    prompt: bytes = b"hi", *, max_tokens: int | None = None, stop_ids: tuple[int, ...] = ()
) -> pb.GenerateRequest:
    params = pb.SamplingParams(temperature=0.0, stop_token_ids=stop_ids)
    if max_tokens is not None:
        params.max_tokens = max_tokens
    return pb.GenerateRequest(
        request_id="r1",
        tokenized=pb.TokenizedInput(input_ids=list(prompt)),
        sampling_params=params,
        stream=True,
    )


async def stub_for(worker: WorkerServer) -> AsyncIterator[pb_grpc.VllmEngineStub]:
    channel = grpc.aio.insecure_channel(worker.address)
    try:
        yield pb_grpc.VllmEngineStub(channel)
    finally:
        await channel.close(None)


async def collect(call: object) -> tuple[list[int], pb.GenerateComplete]:
    tokens: list[int] = []
    async for response in call:  # type: ignore[attr-defined]
        if response.HasField("chunk"):
            tokens.extend(response.chunk.token_ids)
        else:
            return tokens, response.complete
    raise AssertionError("no completion")


async def test_generate_streams_tokens_then_one_completion() -> None:
    """Tokens stream in chunks; the completion carries finish reason, counts and all ids."""
    async with running_worker(FakeBackend(reply="Hello")) as worker:
        async for stub in stub_for(worker):
            tokens, done = await collect(stub.Generate(generate(b"abc")))
    assert list(b"Hello") == tokens
    assert "stop" == done.finish_reason
    assert (3, 5) == (done.prompt_tokens, done.completion_tokens)
    assert list(b"Hello") == list(done.output_ids)


async def test_stop_token_ids_and_max_tokens_end_generation_on_the_worker() -> None:
    """The engine stops at a stop token id (not returned) and at max_tokens ("length")."""
    fake = FakeBackend(reply="Hello world")
    async with running_worker(fake) as worker:
        async for stub in stub_for(worker):
            stopped, done = await collect(stub.Generate(generate(stop_ids=(ord(" "),))))
            cut, cut_done = await collect(stub.Generate(generate(max_tokens=3)))
    assert list(b"Hello") == stopped
    assert "stop" == done.finish_reason
    assert list(b"Hel") == cut
    assert "length" == cut_done.finish_reason
    assert 256 in fake.requests[0].request.stop_token_ids  # EOS added by the worker


async def test_scope_and_shared_prefix_travel_as_metadata() -> None:
    """The prefix-cache scope and shared prefix reach the engine from call metadata."""
    fake = FakeBackend(reply="ok")
    async with running_worker(fake) as worker:
        async for stub in stub_for(worker):
            call = stub.Generate(
                generate(), metadata=((CACHE_SCOPE_KEY, "conv-9"), (SHARED_PREFIX_KEY, "1"))
            )
            await collect(call)
    assert ("conv-9", 1) == (
        fake.requests[0].request.cache_scope,
        fake.requests[0].request.shared_prefix_tokens,
    )


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (pb.GenerateRequest(request_id="x", text="hello"), "token ids"),
        (
            pb.GenerateRequest(request_id="", tokenized=pb.TokenizedInput(input_ids=[1])),
            "request_id",
        ),
        (
            pb.GenerateRequest(
                request_id="x",
                tokenized=pb.TokenizedInput(input_ids=[1]),
                sampling_params=pb.SamplingParams(n=2),
            ),
            "one sample",
        ),
    ],
)
async def test_what_the_worker_cannot_serve_is_invalid_argument(
    request_: pb.GenerateRequest, fragment: str
) -> None:
    """Text input, a missing request id or several samples are INVALID_ARGUMENT, named."""
    async with running_worker(FakeBackend()) as worker:
        async for stub in stub_for(worker):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await collect(stub.Generate(request_))
    assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()
    assert fragment in (raised.value.details() or "")


async def test_abort_by_request_id_stops_the_engine_and_ends_with_abort() -> None:
    """Abort ends a running stream with finish reason "abort" and closes the engine's work."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01)
    async with running_worker(fake) as worker:
        async for stub in stub_for(worker):
            call = stub.Generate(generate())
            first = await anext(aiter(call))
            assert first.chunk.token_ids
            await stub.Abort(pb.AbortRequest(request_ids=["r1", "unknown"]))
            _, done = await collect(call)
            await asyncio.sleep(0.05)
    assert "abort" == done.finish_reason
    assert fake.requests[0].closed
    assert 0 == fake.running


async def test_a_cancelled_call_stops_the_engine() -> None:
    """A client that cancels its Generate call frees the engine's work within a step."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01)
    async with running_worker(fake) as worker:
        async for stub in stub_for(worker):
            call = stub.Generate(generate())
            await anext(aiter(call))
            call.cancel()
            for _ in range(100):
                if fake.running == 0:
                    break
                await asyncio.sleep(0.01)
    assert 0 == fake.running
    assert fake.requests[0].closed


async def test_loads_model_and_server_info() -> None:
    """GetLoads reports running requests and capacity; model and server info describe it."""
    fake = FakeBackend(reply="ab", endless=True, token_delay_s=0.01, max_running=4, model="m1")
    async with running_worker(fake) as worker:
        async for stub in stub_for(worker):
            call = stub.Generate(generate())
            await anext(aiter(call))
            loads = await stub.GetLoads(pb.GetLoadsRequest())
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            server = await stub.GetServerInfo(pb.GetServerInfoRequest())
            health = await stub.HealthCheck(pb.HealthCheckRequest())
            call.cancel()
    assert (1, 4) == (loads.loads[0].num_running_reqs, loads.loads[0].max_running_requests)
    assert ("m1", 4096, [256]) == (
        info.served_model_name,
        info.max_context_length,
        list(info.eos_token_ids),
    )
    assert (1, False, 4) == (server.active_requests, server.is_paused, server.max_num_seqs)
    assert health.healthy


async def test_tokenizer_arrives_as_checked_chunks(tmp_path: object) -> None:
    """GetTokenizer streams a zip whose last chunk names its SHA-256; it unpacks and loads."""
    async with running_worker(FakeBackend()) as worker:
        async for stub in stub_for(worker):
            pieces = [
                (c.data, c.sha256)
                async for c in stub.GetTokenizer(common_pb2.GetTokenizerRequest())
            ]
    assert pieces[-1][1]
    source = unpack_tokenizer(pieces, str(tmp_path))
    assert "bytes" == source.kind
    with pytest.raises(Exception, match="SHA-256"):
        unpack_tokenizer([(pieces[0][0] + b"x", pieces[-1][1])], str(tmp_path))


async def test_the_worker_accepts_only_callers_with_its_token() -> None:
    """With worker.token set, calls without it are UNAUTHENTICATED; health checks are open."""
    async with running_worker(FakeBackend(), token="s3cret") as worker:
        async for stub in stub_for(worker):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.GetModelInfo(pb.GetModelInfoRequest())
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await collect(stub.Generate(generate()))
            good = await stub.GetModelInfo(
                pb.GetModelInfoRequest(), metadata=(("authorization", "Bearer s3cret"),)
            )
        channel = grpc.aio.insecure_channel(worker.address)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        await channel.close(None)
    assert grpc.StatusCode.UNAUTHENTICATED == raised.value.code()
    assert grpc.StatusCode.UNAUTHENTICATED == streamed.value.code()
    assert "fake" == good.served_model_name
    assert health_pb2.HealthCheckResponse.SERVING == health.status


async def test_drain_finishes_running_streams_and_refuses_new_ones() -> None:
    """On stop, a running stream finishes; new Generate calls are UNAVAILABLE and
    HealthCheck says unhealthy meanwhile."""
    fake = FakeBackend(reply="x" * 30, token_delay_s=0.01)
    async with running_worker(fake) as worker:
        async for stub in stub_for(worker):
            call = stub.Generate(generate())
            await anext(aiter(call))
            stopping = asyncio.create_task(worker.stop(5.0))
            await asyncio.sleep(0.05)
            health = await stub.HealthCheck(pb.HealthCheckRequest())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(stub.Generate(generate()))
            tokens, done = await collect(call)
            await stopping
    assert not health.healthy
    assert grpc.StatusCode.UNAVAILABLE == refused.value.code()
    assert "stop" == done.finish_reason
    assert 29 == len(tokens)


async def test_a_message_interval_merges_the_tokens_made_meanwhile() -> None:
    """With worker.message_interval_ms, tokens made between two messages ride together:
    the same answer in far fewer messages, the first token still sent at once."""
    fake = FakeBackend(reply="x" * 40, token_delay_s=0.002)
    async with running_worker(fake, message_interval_ms=20.0) as worker:
        async for stub in stub_for(worker):
            sizes = [
                len(r.chunk.token_ids)
                async for r in stub.Generate(generate())
                if r.HasField("chunk")
            ]
    assert 40 == sum(sizes)
    assert 1 == sizes[0]
    assert len(sizes) <= 10


async def test_a_caller_asks_for_its_own_message_interval() -> None:
    """A gateway asks for fewer messages per call (tokenwire-message-interval-ms):
    the worker's own default (every token at once) still holds for other callers."""
    fake = FakeBackend(reply="x" * 40, token_delay_s=0.002)
    async with running_worker(fake) as worker:
        async for stub in stub_for(worker):
            asked = [
                len(r.chunk.token_ids)
                async for r in stub.Generate(generate(), metadata=((MESSAGE_INTERVAL_KEY, "20"),))
                if r.HasField("chunk")
            ]
            plain = [
                len(r.chunk.token_ids)
                async for r in stub.Generate(generate())
                if r.HasField("chunk")
            ]
    assert 40 == sum(asked) == sum(plain)
    assert 1 == asked[0]
    assert len(asked) <= 10 < len(plain)


@pytest.mark.parametrize("value", ["-1", "1001", "soon", "nan"])
async def test_a_message_interval_out_of_range_is_invalid(value: str) -> None:
    async with running_worker(FakeBackend(reply="Hello")) as worker:
        async for stub in stub_for(worker):
            call = stub.Generate(generate(), metadata=((MESSAGE_INTERVAL_KEY, value),))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(call)
    assert grpc.StatusCode.INVALID_ARGUMENT == refused.value.code()
    assert MESSAGE_INTERVAL_KEY in (refused.value.details() or "")
