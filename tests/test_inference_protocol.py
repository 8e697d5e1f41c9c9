"""The Open Inference Protocol frontend, driven by tritonclient's own clients."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as syncclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tokenwire.auth.keys import make_principal
from tokenwire.backend import Engine
from tokenwire.config import Config
from tokenwire.moderation import ModerationConfig
from tokenwire.quotas import PlanLimits, QuotaConfig
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import (
    BorrowedEngine,
    FakeBackend,
    RunningServer,
    config_for_tests,
    running_server,
)

FLAGGED_INPUT = "Listen: I w1ll K.I.L.L you tomorrow."
FLAGGED_REPLY = "Sure. Here it is: I will kill you now, said the villain."


def inference_config(**sections: Any) -> Config:
    config = config_for_tests(**sections)
    return dataclasses.replace(
        config, server=dataclasses.replace(config.server, open_inference=True)
    )


def tensor(module: Any, name: str, datatype: str, value: Any) -> Any:
    """One input of batch 1 for a tritonclient module (grpc or grpc.aio)."""
    dtype = {"BYTES": object, "INT32": np.int32, "BOOL": bool, "FP32": np.float32}[datatype]
    array = np.array([value if isinstance(value, list) else [value]], dtype=dtype)
    item = module.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def inputs(module: Any, message: str, *, max_tokens: int = 16, stream: bool = False) -> list[Any]:
    return [
        tensor(module, "text_input", "BYTES", message.encode()),
        tensor(module, "max_tokens", "INT32", max_tokens),
        tensor(module, "stream", "BOOL", stream),
    ]


def text_of(result: Any) -> str:
    array = result.as_numpy("text_output")
    return "" if array is None else array.reshape(-1)[0].decode()


def is_final(result: Any) -> bool:
    flag = result.get_response().parameters.get("triton_final_response")
    return flag is not None and flag.bool_param


async def requests(*items: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


@asynccontextmanager
async def served(
    backend: Any, config: Config | None = None, **kwargs: Any
) -> AsyncIterator[tuple[RunningServer, aioclient.InferenceServerClient]]:
    async with running_server(backend, config or inference_config(), **kwargs) as running:
        client = aioclient.InferenceServerClient(running.address)
        try:
            yield running, client
        finally:
            await client.close()


async def test_server_and_model_information() -> None:
    """Live, ready, metadata and config answer as Triton's do, decoupled."""
    async with served(FakeBackend()) as (_, client):
        live, ready = await client.is_server_live(), await client.is_server_ready()
        model_ready = await client.is_model_ready("fake")
        other_ready = await client.is_model_ready("ensemble")
        metadata = await client.get_model_metadata("fake", as_json=True)
        config = await client.get_model_config("fake", as_json=True)
        server = await client.get_server_metadata(as_json=True)
    assert (True, True, True, False) == (live, ready, model_ready, other_ready)
    assert {"text_input", "max_tokens", "stream", "stop_words"} <= {
        i["name"] for i in metadata["inputs"]
    }
    assert "text_output" in {o["name"] for o in metadata["outputs"]}
    assert config["config"]["model_transaction_policy"]["decoupled"]
    assert "tokenwire" == server["name"]


async def test_infer_returns_the_whole_answer() -> None:
    """A unary ModelInfer is one turn: the whole answer, its counts and finish reason."""
    store = SQLiteConversationStore(":memory:")
    async with served(FakeBackend(reply="Hello there."), store=store) as (_, client):
        result = await client.infer("fake", inputs(aioclient, "Hi"))
        conversation = result.as_numpy("conversation_id").reshape(-1)[0].decode()
        messages = await store.list_messages("default/anonymous", conversation)
    assert "Hello there." == text_of(result)
    assert b"stop" == result.as_numpy("finish_reason").reshape(-1)[0]
    assert 12 == int(result.as_numpy("num_output_tokens").reshape(-1)[0])
    assert [("user", "Hi"), ("assistant", "Hello there.")] == [
        (m.role, m.content) for m in messages
    ]


async def test_stream_infer_streams_deltas_then_a_final_response() -> None:
    """tritonclient.grpc.aio's stream_infer gets the answer as deltas, the last flagged final."""
    fake = FakeBackend(reply="One two three four.", token_delay_s=0.002)
    async with served(fake) as (_, client):
        results = []
        call = client.stream_infer(
            requests(
                {
                    "model_name": "fake",
                    "inputs": inputs(aioclient, "Hi", max_tokens=64, stream=True),
                }
            )
        )
        async for result, error in call:
            assert error is None
            results.append(result)
            if is_final(result):
                break
    assert len(results) > 2
    assert "One two three four." == "".join(text_of(r) for r in results)
    assert [False] * (len(results) - 1) + [True] == [is_final(r) for r in results]
    assert b"stop" == results[-1].as_numpy("finish_reason").reshape(-1)[0]


async def test_cancelling_the_stream_stops_the_engine_and_keeps_what_was_sent() -> None:
    """Cancel mid-answer: the engine stops, the answer is stored as sent and incomplete."""
    store = SQLiteConversationStore(":memory:")
    fake = FakeBackend(reply="word ", endless=True, token_delay_s=0.005)
    async with served(fake, store=store) as (_, client):
        call = client.stream_infer(
            requests(
                {
                    "model_name": "fake",
                    "inputs": inputs(aioclient, "Hi", max_tokens=500, stream=True),
                }
            )
        )
        received = ""
        async for result, error in call:
            assert error is None
            received += text_of(result)
            if len(received) >= 10:
                break
        call.cancel()
        for _ in range(500):
            if fake.requests and fake.requests[0].closed and not fake.running:
                break
            await asyncio.sleep(0.01)
        page = await store.list_conversations("default/anonymous", page_size=10)
        messages = await store.list_messages("default/anonymous", page.items[0].id)
    assert fake.requests[0].closed
    assert 0 == fake.running
    assert messages[1].content.startswith(received)
    assert not messages[1].complete


def _sync_stream(address: str) -> list[Any]:
    """tritonclient's synchronous decoupled API: start_stream and async_stream_infer."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = syncclient.InferenceServerClient(address)
    try:
        unary = client.infer("fake", inputs(syncclient, "Hi"))
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(
            "fake",
            inputs(syncclient, "Hi", stream=True),
            request_id="s1",
            enable_empty_final_response=True,
        )
        got = [unary]
        while True:
            result, error = results.get(timeout=10)
            assert error is None
            got.append(result)
            if is_final(result):
                break
        client.stop_stream()
        return got
    finally:
        client.close()


async def test_the_synchronous_client_and_its_decoupled_stream() -> None:
    """The blocking client's infer and start_stream/async_stream_infer work; the empty
    final response closes the streamed answer."""
    async with served(FakeBackend(reply="Hello there.")) as (running, _):
        unary, *streamed = await asyncio.to_thread(_sync_stream, running.address)
    assert "Hello there." == text_of(unary)
    assert "Hello there." == "".join(text_of(r) for r in streamed)
    assert streamed[-1].as_numpy("text_output") is None  # the empty final response
    assert "s1" == streamed[-1].get_response().id


async def test_a_bad_request_in_a_stream_is_reported_and_the_stream_goes_on() -> None:
    """An invalid request gets an in-stream error with its status; the next one is answered."""
    async with served(FakeBackend(reply="Fine.")) as (_, client):
        bad = [tensor(aioclient, "max_tokens", "INT32", 4)]
        call = client.stream_infer(
            requests(
                {"model_name": "fake", "inputs": bad, "request_id": "bad"},
                {"model_name": "fake", "inputs": inputs(aioclient, "Hi"), "request_id": "good"},
            )
        )
        outcomes = [
            (r.get_response().id if r else None, str(e) if e else None) async for r, e in call
        ]
    errors = [e for _, e in outcomes if e]
    assert 1 == len(errors)
    assert errors[0].startswith("INVALID_ARGUMENT")
    assert "text_input" in errors[0]
    assert ("good", None) == outcomes[-1]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: [tensor(aioclient, "max_tokens", "INT32", 4)], "text_input"),
        (lambda: [*inputs(aioclient, "Hi"), tensor(aioclient, "colour", "INT32", 1)], "colour"),
        (lambda: [tensor(aioclient, "text_input", "INT32", 7)], "must be BYTES"),
        (lambda: [tensor(aioclient, "text_input", "BYTES", [b"a", b"b"])], "exactly one"),
    ],
)
async def test_bad_inputs_are_invalid_argument(build: Any, message: str) -> None:
    """Wrong tensors are INVALID_ARGUMENT naming the problem, never a stack trace."""
    async with served(FakeBackend()) as (_, client):
        with pytest.raises(InferenceServerException) as refused:
            await client.infer("fake", build())
    assert "StatusCode.INVALID_ARGUMENT" == refused.value.status()
    assert message in refused.value.message()


async def test_an_unknown_model_is_not_found() -> None:
    """A model the gateway does not serve is NOT_FOUND."""
    async with served(FakeBackend()) as (_, client):
        with pytest.raises(InferenceServerException) as refused:
            await client.infer("ensemble", inputs(aioclient, "Hi"))
    assert "StatusCode.NOT_FOUND" == refused.value.status()


async def test_the_same_auth_quotas_and_moderation_apply() -> None:
    """No key: UNAUTHENTICATED; a key: answered; flagged input refused, flagged output cut;
    past the request quota: RESOURCE_EXHAUSTED, in the stream too."""
    base = config_for_tests()
    config = inference_config(
        auth=dataclasses.replace(base.auth, enabled=True, api_keys=True, bootstrap_admin_key=False),
        quotas=QuotaConfig(plans={"free": PlanLimits(requests_per_minute=4)}, default_plan="free"),
        moderation=ModerationConfig(enabled=True, moderator="rules", input=True, output=True),
    )
    async with served(FakeBackend(reply=FLAGGED_REPLY), config) as (running, client):
        auth = running.server.pipeline.auth
        assert auth is not None
        issued = await auth.key_store.create_key(make_principal("acme", "alice"))
        headers = {"authorization": f"Bearer {issued.secret}"}
        with pytest.raises(InferenceServerException) as anonymous:
            await client.infer("fake", inputs(aioclient, "Hi"))
        story = inputs(aioclient, "Tell me a story.", max_tokens=64)
        cut = await client.infer("fake", story, headers=headers)
        with pytest.raises(InferenceServerException) as flagged:
            await client.infer("fake", inputs(aioclient, FLAGGED_INPUT), headers=headers)
        call = client.stream_infer(
            requests(*({"model_name": "fake", "inputs": inputs(aioclient, "Hi")},) * 3),
            headers=headers,
        )
        stream_errors = [str(e) async for _, e in call if e is not None]
    assert "StatusCode.UNAUTHENTICATED" == anonymous.value.status()
    assert b"content_filter" == cut.as_numpy("finish_reason").reshape(-1)[0]
    assert "kill" not in text_of(cut)
    assert flagged.value.status() in ("StatusCode.INVALID_ARGUMENT", "StatusCode.PERMISSION_DENIED")
    assert stream_errors
    assert all(e.startswith("RESOURCE_EXHAUSTED") for e in stream_errors)


async def test_a_conversation_continues_by_its_id() -> None:
    """The conversation_id parameter continues the conversation an earlier answer named."""
    store = SQLiteConversationStore(":memory:")
    async with served(FakeBackend(reply="Noted."), store=store) as (_, client):
        first = await client.infer("fake", inputs(aioclient, "One"))
        conversation = first.as_numpy("conversation_id").reshape(-1)[0].decode()
        await client.infer(
            "fake", inputs(aioclient, "Two"), parameters={"conversation_id": conversation}
        )
        messages = await store.list_messages("default/anonymous", conversation)
    assert ["One", "Noted.", "Two", "Noted."] == [m.content for m in messages]


async def test_statistics_count_successes_and_failures() -> None:
    """ModelStatistics counts answered and failed requests."""
    async with served(FakeBackend(reply="ok", fail_after=None)) as (_, client):
        await client.infer("fake", inputs(aioclient, "Hi"))
        with pytest.raises(InferenceServerException):
            await client.infer("fake", inputs(aioclient, "Hi", max_tokens=-1))
        with pytest.raises(InferenceServerException):  # refused before its turn
            await client.infer("fake", [tensor(aioclient, "max_tokens", "INT32", 4)])
        stats = await client.get_inference_statistics("fake", as_json=True)
    entry = stats["model_stats"][0]
    assert ("1", "2") == (
        entry["inference_stats"]["success"]["count"],
        entry["inference_stats"]["fail"]["count"],
    )


async def test_other_calls_are_unimplemented() -> None:
    """Repository, shared-memory and trace calls are UNIMPLEMENTED, not INTERNAL."""
    async with (
        served(FakeBackend()) as (running, _),
        grpc.aio.insecure_channel(running.address) as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RepositoryIndex(service_pb2.RepositoryIndexRequest())
    assert grpc.StatusCode.UNIMPLEMENTED == refused.value.code()


@pytest.mark.model
async def test_the_real_model_streams_through_tritonclient(torch_engine: Engine) -> None:
    """SmolLM2 answers a streamed request from tritonclient.grpc.aio; a cancel stops it."""
    async with served(BorrowedEngine(torch_engine)) as (running, client):
        model = running.server.model.name
        answer = ""
        call = client.stream_infer(
            requests(
                {
                    "model_name": model,
                    "inputs": inputs(
                        aioclient, "What is the capital of France?", max_tokens=24, stream=True
                    ),
                }
            )
        )
        async for result, error in call:
            assert error is None
            answer += text_of(result)
            if is_final(result):
                break
        second = client.stream_infer(
            requests(
                {
                    "model_name": model,
                    "inputs": inputs(aioclient, "Count to fifty.", max_tokens=200, stream=True),
                }
            )
        )
        async for result, _ in second:
            if text_of(result):
                break
        second.cancel()
        for _ in range(500):
            if not torch_engine.load().running:
                break
            await asyncio.sleep(0.01)
        running_after = torch_engine.load().running
    assert "Paris" in answer
    assert 0 == running_after


async def test_infer_refuses_stream_true() -> None:
    """ModelInfer sends one response: asking it to stream is INVALID_ARGUMENT, not lost text."""
    async with served(FakeBackend()) as (_, client):
        with pytest.raises(InferenceServerException) as refused:
            await client.infer("fake", inputs(aioclient, "Hi", stream=True))
    assert "StatusCode.INVALID_ARGUMENT" == refused.value.status()
    assert "ModelStreamInfer" in refused.value.message()


async def test_the_ensembles_other_inputs_are_taken_at_their_neutral_values() -> None:
    """A client written for TensorRT-LLM's ensemble (random_seed, beam_width 1, penalties
    off, counts asked for) is answered; an input this server cannot honour is refused."""
    async with served(FakeBackend(reply="Fine.")) as (_, client):
        ensemble = [
            *inputs(aioclient, "Hi"),
            tensor(aioclient, "beam_width", "INT32", 1),
            tensor(aioclient, "repetition_penalty", "FP32", 1.0),
            tensor(aioclient, "return_num_output_tokens", "BOOL", True),
            tensor(aioclient, "bad_words", "BYTES", []),
        ]
        seed = aioclient.InferInput("random_seed", [1, 1], "UINT64")
        seed.set_data_from_numpy(np.array([[7]], dtype=np.uint64))
        answered = await client.infer("fake", [*ensemble, seed])
        with pytest.raises(InferenceServerException) as refused:
            await client.infer(
                "fake", [*inputs(aioclient, "Hi"), tensor(aioclient, "beam_width", "INT32", 4)]
            )
    assert "Fine." == text_of(answered)
    assert "StatusCode.INVALID_ARGUMENT" == refused.value.status()
    assert "beam_width" in refused.value.message()


async def test_drain_ends_an_idle_open_stream() -> None:
    """On shutdown a stream the client keeps open ends once its requests are answered."""
    hold = asyncio.Event()

    async def one_then_wait() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": "fake", "inputs": inputs(aioclient, "Hi")}
        await hold.wait()

    running_cm = served(FakeBackend(reply="Bye."))
    running, client = await running_cm.__aenter__()
    try:
        call = client.stream_infer(one_then_wait())
        first, error = await anext(call)
        assert error is None
        stopping = asyncio.ensure_future(running.server.stop(grace=30))
        rest = await asyncio.wait_for(_drain_rest(call), 10)
        await asyncio.wait_for(stopping, 10)
    finally:
        hold.set()
        await running_cm.__aexit__(None, None, None)
    assert "Bye." == text_of(first)
    assert [] == rest


async def _drain_rest(call: Any) -> list[Any]:
    return [item async for item in call]


async def test_concurrent_generations_take_a_stream_slot_each() -> None:
    """With one concurrent stream allowed, a second ModelInfer or a second request on one
    ModelStreamInfer is refused while the first generates."""
    base = config_for_tests()
    config = inference_config(
        auth=dataclasses.replace(base.auth, enabled=True, api_keys=True, bootstrap_admin_key=False),
        quotas=QuotaConfig(plans={"one": PlanLimits(concurrent_streams=1)}, default_plan="one"),
    )
    fake = FakeBackend(reply="slow ", endless=True, token_delay_s=0.01)
    async with served(fake, config) as (running, client):
        auth = running.server.pipeline.auth
        assert auth is not None
        issued = await auth.key_store.create_key(make_principal("acme", "bob"))
        headers = {"authorization": f"Bearer {issued.secret}"}
        first = asyncio.ensure_future(
            client.infer("fake", inputs(aioclient, "Hi", max_tokens=30), headers=headers)
        )
        for _ in range(500):
            if fake.running:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(InferenceServerException) as second:
            await client.infer("fake", inputs(aioclient, "Hi", max_tokens=2), headers=headers)
        await first
        call = client.stream_infer(
            requests(
                *({"model_name": "fake", "inputs": inputs(aioclient, "Hi", max_tokens=30)},) * 2
            ),
            headers=headers,
        )
        errors = [str(e) async for _, e in call if e is not None]
    assert "StatusCode.RESOURCE_EXHAUSTED" == second.value.status()
    assert 1 == len(errors)
    assert errors[0].startswith("RESOURCE_EXHAUSTED")
