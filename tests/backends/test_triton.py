"""The Triton text backend, pointed at a Tokenwire gateway's Open Inference Protocol frontend."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Callable

import pytest
from tokenwire_triton import TritonBackend, TritonOptions

from tokenwire.backend import BackendConfig, ChatMessage, TextRequest, create_backend
from tokenwire.config import Config
from tokenwire.errors import ConfigError, InvalidArgumentError, ResourceExhaustedError
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server
from tokenwire.testing.text_conformance import TextBackendConformance, collect_text


def inference_config() -> Config:
    config = config_for_tests()
    return dataclasses.replace(
        config, server=dataclasses.replace(config.server, open_inference=True)
    )


@pytest.fixture(scope="module")
async def inner_fake() -> FakeBackend:
    """The engine behind the inner gateway: endless, a token every millisecond."""
    return FakeBackend(
        reply="Once upon a time, a keeper lit the lamp. ", endless=True, token_delay_s=0.001
    )


@pytest.fixture(scope="module")
async def inner(inner_fake: FakeBackend) -> AsyncIterator[RunningServer]:
    """A Tokenwire gateway serving the Open Inference Protocol: "Triton" that is Tokenwire."""
    async with running_server(inner_fake, inference_config()) as running:
        yield running


@pytest.fixture(scope="module")
async def triton(inner: RunningServer) -> AsyncIterator[TritonBackend]:
    """The Triton backend over the inner gateway's model."""
    backend = create_backend(
        BackendConfig(
            name="triton",
            options={
                "url": inner.address,
                "model": "fake",
                "prompt": "last_message",
                "stats_interval_s": "0.05",
            },
        )
    )
    assert isinstance(backend, TritonBackend)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


class TestTritonBackendConformance(TextBackendConformance):
    """The text backend contract holds across Triton's protocol."""

    @pytest.fixture
    def backend(self, triton: TritonBackend) -> TritonBackend:
        return triton

    @pytest.fixture
    def upstream_in_flight(self, inner_fake: FakeBackend) -> Callable[[], int]:
        """The inner engine's running requests: a cancel must stop them too."""
        return lambda: inner_fake.running


async def test_a_gateway_in_front_of_triton_streams_turns(inner: RunningServer) -> None:
    """Tokenwire in front of "Triton" that is Tokenwire: a chat turn streams end to end."""
    config = dataclasses.replace(
        config_for_tests(),
        backend=BackendConfig(
            name="triton", options={"url": inner.address, "model": "fake", "prompt": "last_message"}
        ),
    )
    backend = create_backend(config.backend)
    async with running_server(backend, config) as outer:
        request = chat_pb2.CompleteRequest(
            message="Tell me a story.", params=chat_pb2.SamplingParams(max_tokens=12)
        )
        events = [e async for e in outer.chat.Complete(request)]
    text = "".join(e.delta.text for e in events if e.HasField("delta"))
    assert "Once upon a " == text
    finished = events[-1].finished
    assert (chat_pb2.FINISH_REASON_LENGTH, 12) == (
        finished.finish_reason,
        finished.usage.completion_tokens,
    )


async def test_a_refusal_upstream_keeps_its_meaning() -> None:
    """The inner gateway at capacity: the backend raises RESOURCE_EXHAUSTED, not a failure."""
    full = FakeBackend(reply="never", max_running=0)
    async with running_server(full, inference_config()) as inner:
        backend = TritonBackend(TritonOptions.parse({"url": inner.address, "model": "fake"}))
        await backend.start()
        try:
            request = TextRequest("r", [ChatMessage("user", "hi")], max_tokens=4)
            with pytest.raises(ResourceExhaustedError):
                await collect_text(backend, request)
        finally:
            await backend.close()


async def test_an_unknown_model_fails_at_start(inner: RunningServer) -> None:
    """A model Triton does not serve is a ConfigError at start, naming it."""
    backend = TritonBackend(TritonOptions.parse({"url": inner.address, "model": "ensemble"}))
    with pytest.raises(ConfigError, match="'ensemble' is not ready"):
        await backend.start()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs url=HOST:PORT"),
        ({"url": "h:1", "colour": "red"}, "unknown Triton option 'colour'"),
        ({"url": "h:1", "output": "all"}, "delta or cumulative"),
        ({"url": "h:1", "prompt": "chat_template"}, "needs tokenizer="),
        ({"url": "h:1", "name.nope": "x"}, "tensors that can be renamed"),
        ({"url": "h:1", "max_batch": "many"}, "max_batch must be an integer"),
    ],
)
def test_options_are_checked_with_a_clear_error(options: dict[str, str], message: str) -> None:
    """Every wrong option is a ConfigError that says what is wrong."""
    with pytest.raises(ConfigError, match=message):
        TritonOptions.parse(options)


def test_renamed_tensors_are_used() -> None:
    """name.<tensor> renames one tensor and leaves the others."""
    options = TritonOptions.parse({"url": "h:1", "name.text_output": "OUTPUT_0"})
    assert ("OUTPUT_0", "text_input") == (options.name("text_output"), options.name("text_input"))


REAL_TRITON = os.environ.get("TOKENWIRE_TRITON_URL", "")


@pytest.fixture(scope="module")
async def real_triton() -> AsyncIterator[TritonBackend]:
    """A real Triton server with TensorRT-LLM, named by TOKENWIRE_TRITON_URL (and _MODEL)."""
    if not REAL_TRITON:
        pytest.skip(
            "no real Triton: set TOKENWIRE_TRITON_URL=HOST:PORT (and TOKENWIRE_TRITON_MODEL)"
        )
    model = os.environ.get("TOKENWIRE_TRITON_MODEL", "ensemble")
    output = "cumulative" if model == "tensorrt_llm_bls" else "delta"
    backend = TritonBackend(
        TritonOptions.parse({"url": REAL_TRITON, "model": model, "output": output})
    )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.mark.gpu
class TestRealTritonConformance(TextBackendConformance):
    """On a GPU box: the same contract against Triton serving TensorRT-LLM."""

    @pytest.fixture
    def messages(self) -> list[ChatMessage]:
        return [ChatMessage("user", "Count from one to one hundred in words, comma-separated.")]

    @pytest.fixture
    def backend(self, real_triton: TritonBackend) -> TritonBackend:
        return real_triton


async def test_a_request_the_server_refuses_is_invalid_argument(inner: RunningServer) -> None:
    """A message over the server's limit comes back as INVALID_ARGUMENT, not as an outage."""
    backend = TritonBackend(
        TritonOptions.parse({"url": inner.address, "model": "fake", "prompt": "last_message"})
    )
    await backend.start()
    try:
        huge = TextRequest("r", [ChatMessage("user", "x" * 40_000)], max_tokens=4)
        with pytest.raises(InvalidArgumentError, match="refused the request"):
            await collect_text(backend, huge)
    finally:
        await backend.close()


async def test_a_server_that_wants_credentials_fails_at_start() -> None:
    """Without backend.options token, a server with authentication on fails start-up clearly."""
    base = config_for_tests()
    config = dataclasses.replace(
        inference_config(),
        auth=dataclasses.replace(base.auth, enabled=True, api_keys=True, bootstrap_admin_key=False),
    )
    async with running_server(FakeBackend(), config) as guarded:
        backend = TritonBackend(TritonOptions.parse({"url": guarded.address, "model": "fake"}))
        with pytest.raises(ConfigError, match=r"check backend\.options url and token"):
            await backend.start()
