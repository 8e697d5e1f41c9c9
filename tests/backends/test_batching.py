"""Continuous batching in the torch engine: joining, leaving, chunked prefill, the budget."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from tests.backends.conftest import needs_fbgemm, tiny_llama
from tokenwire.backend import BackendConfig, Engine, GenerateRequest, SamplingParams
from tokenwire.errors import ConfigError, ResourceExhaustedError
from tokenwire.testing.conformance import EngineConformance
from tokenwire_torch import TorchEngine, create_engine
from tokenwire_torch.batching import Batcher
from tokenwire_torch.llama import LlamaForward, cpu_has_fbgemm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama (grouped-query attention), without EOS, on disk."""
    directory = tmp_path_factory.mktemp("batch-llama")
    tiny_llama(seed=1, eos=False).save_pretrained(directory)
    return directory


@pytest.fixture
async def engine(checkpoint: Path) -> AsyncIterator[TorchEngine]:
    """Three slots, prompts prefilled 8 tokens a step, float32."""
    config = BackendConfig(
        model_path=str(checkpoint),
        max_running=3,
        dtype="float32",
        options={"prefill_chunk": "8", "kv_cache_mb": "4"},
    )
    started = create_engine(config)
    assert isinstance(started, TorchEngine)
    await started.start()
    yield started
    await started.close()


def _request(
    prompt: list[int], tokens: int, scope: str = "", shared: int = 0, **sampling: object
) -> GenerateRequest:
    return GenerateRequest(
        request_id=f"r{prompt[0]}-{tokens}",
        prompt_token_ids=tuple(prompt),
        max_tokens=tokens,
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
        cache_scope=scope,
        shared_prefix_tokens=shared,
    )


async def _all(engine: TorchEngine, request: GenerateRequest) -> list[int]:
    return [t async for chunk in engine.generate(request) for t in chunk.token_ids]


async def test_a_request_joining_a_running_batch_gets_its_own_greedy_tokens(
    engine: TorchEngine,
) -> None:
    """B starts while A streams; each gets exactly the tokens it gets alone."""
    first, second = [5, 6, 7, 8, 9], [200, 201, 202, 17, 18, 19, 20, 21, 22, 23, 24]
    want_a = await _all(engine, _request(first, 30))
    want_b = await _all(engine, _request(second, 20))
    stream_a = engine.generate(_request(first, 30))
    got_a = list((await anext(stream_a)).token_ids)
    while len(got_a) < 5:
        got_a += (await anext(stream_a)).token_ids
    got_b = await _all(engine, _request(second, 20))
    got_a += [t async for chunk in stream_a for t in chunk.token_ids]
    assert (want_a, want_b) == (got_a, got_b)


async def test_a_seeded_answer_does_not_depend_on_its_batch_mates(engine: TorchEngine) -> None:
    """The same seed gives the same sampled tokens alone and beside another request."""
    prompt, seeded = [40, 41, 42], {"temperature": 0.9, "top_p": 0.9, "seed": 7}
    alone = await _all(engine, _request(prompt, 20, **seeded))
    mate = engine.generate(_request([60, 61], 40, temperature=1.0))
    await anext(mate)
    together = await _all(engine, _request(prompt, 20, **seeded))
    await mate.aclose()
    assert alone == together


async def test_a_cancel_frees_the_slot_at_once(engine: TorchEngine) -> None:
    """Closing a stream frees its slot before aclose() returns: the engine is empty, and
    a full set of new requests is admitted."""
    streams = [engine.generate(_request([i + 1, 2, 3], 100)) for i in range(3)]
    for stream in streams:
        await anext(stream)
    with pytest.raises(ResourceExhaustedError):
        await anext(engine.generate(_request([9], 5)))
    for stream in streams:
        await stream.aclose()
    load = engine.load()
    assert (0, 0, 0.0) == (load.running, load.queued, load.kv_cache_usage)
    again = [engine.generate(_request([i + 10], 3)) for i in range(3)]
    for stream in again:
        assert (await anext(stream)).token_ids
        await stream.aclose()


async def test_a_long_prompt_never_stalls_a_running_stream(engine: TorchEngine) -> None:
    """A 96-token prompt arrives while A streams: it is prefilled 8 tokens a step, and A
    gets a token every step meanwhile (12 steps: at least 12 tokens before B's first)."""
    stream_a = engine.generate(_request([1, 2, 3], 120))
    await anext(stream_a)
    before = engine.steps_executed
    stream_b = engine.generate(_request(list(range(100, 196)), 3))
    first_b = await anext(stream_b)
    steps = engine.steps_executed - before
    received = 0
    while True:
        chunk = await anext(stream_a)
        received += len(chunk.token_ids)
        if received >= 12:
            break
    await stream_b.aclose()
    await stream_a.aclose()
    assert first_b.token_ids
    # 12 prefill chunks of B, each step also decoding A (two passes a step).
    assert 12 * 2 <= steps <= 13 * 2 + 2


async def test_the_cache_is_a_fixed_budget(engine: TorchEngine) -> None:
    """The cache is preallocated within kv_cache_mb, and admission past it is refused, so
    no load grows it; a row holds prompt plus answer (the context reported)."""
    assert 0 < engine.kv_cache_bytes <= 4 * 1024 * 1024
    context = engine.capabilities.context_length
    per_row = engine.kv_cache_bytes // 3
    assert per_row // context == 2 * 2 * 2 * 16 * 4  # k and v, layers, kv heads, dim, float32
    refused = 0
    streams = []
    for i in range(64):
        try:
            stream = engine.generate(_request([i + 1], 50))
            await anext(stream)
            streams.append(stream)
        except ResourceExhaustedError:
            refused += 1
    assert (3, 61) == (len(streams), refused)
    for stream in streams:
        await stream.aclose()


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(
    params=[
        "transformers",
        "own-float",
        "own-int8",
        "own-int4",
        pytest.param("own-fp16", marks=needs_fbgemm),
        pytest.param("own-cuda", marks=_CUDA),
        pytest.param("own-cuda-compiled", marks=_CUDA),
    ]
)
async def any_setting(request: pytest.FixtureRequest, checkpoint: Path) -> AsyncIterator[Engine]:
    """The tiny model under every forward and weight setting (and on CUDA, bf16, with
    CUDA graphs or without, where there is a GPU)."""
    forward, _, setting = str(request.param).partition("-")
    options = {"forward": forward, "kv_cache_mb": "4"}
    device = "cpu"
    if setting.startswith("cuda"):
        device = "cuda"
        options["compile"] = "on" if setting.endswith("compiled") else "off"
    elif setting:
        options["weights"] = setting
    engine = create_engine(
        BackendConfig(model_path=str(checkpoint), device=device, max_running=2, options=options)
    )
    await engine.start()
    yield engine
    await engine.close()


class TestEverySettingConforms(EngineConformance):
    """The framework's engine conformance suite on each forward and weight setting."""

    @pytest.fixture
    async def engine(self, any_setting: Engine) -> Engine:
        """The engine under test."""
        return any_setting

    @pytest.fixture
    def prompt_ids(self) -> list[int]:
        """A short prompt (the tiny model has no EOS: it never ends early)."""
        return [3, 4, 5, 6]


async def test_the_next_turn_reuses_the_cached_prefix(
    engine: TorchEngine, checkpoint: Path
) -> None:
    """A second turn that starts with the first turn's prompt and answer prefills only
    what is new, and answers exactly as an engine without the cache does; the same
    prompt in another conversation (scope), or one that shares nothing, reuses nothing."""
    first = list(range(30, 70))
    answer = await _all(engine, _request(first, 10, "conv-a"))
    second = first + answer[:9] + [7, 8, 9, 10]
    hits = engine.prefix_cache_hits
    await _all(engine, _request(second, 2, "conv-b"))
    assert hits == engine.prefix_cache_hits  # another conversation's keys are never served
    await _all(engine, _request(first, 10, "conv-a"))  # conv-a's keys, cached again
    hits = engine.prefix_cache_hits
    reused = await _all(engine, _request(second, 12, "conv-a"))
    assert engine.prefix_cache_hits - hits >= len(first)
    assert await _uncached(checkpoint, second, 12) == reused
    hits = engine.prefix_cache_hits
    await _all(engine, _request([300, 301, 302] * 10, 3, "conv-a"))
    assert hits == engine.prefix_cache_hits


async def test_the_shared_opening_is_reused_across_conversations(
    engine: TorchEngine, checkpoint: Path
) -> None:
    """Another conversation reuses the keys of the first ``shared_prefix_tokens`` (a
    system prompt every conversation has), never more even where more tokens match,
    and answers as an engine without the cache does."""
    system = list(range(30, 60))
    await _all(engine, _request([*system, 1, 2, 3, 4, 5, 6], 5, "conv-a"))
    hits = engine.prefix_cache_hits
    prompt = [*system, 1, 2, 3, 4, 9]
    answer = await _all(engine, _request(prompt, 8, "conv-b", shared=len(system)))
    assert len(system) == engine.prefix_cache_hits - hits
    assert await _uncached(checkpoint, prompt, 8) == answer


async def test_the_shared_opening_is_copied_from_a_running_conversation(
    engine: TorchEngine, checkpoint: Path
) -> None:
    """While one conversation still streams, another that starts with the same shared
    opening gets those keys copied into its own slot (no prefill for them), and answers
    as an engine without the cache does."""
    system = list(range(30, 60))
    running = engine.generate(_request([*system, 1, 2, 3], 50, "conv-a"))
    await anext(running)
    hits = engine.prefix_cache_hits
    prompt = [*system, 7, 8, 9, 10]
    answer = await _all(engine, _request(prompt, 8, "conv-b", shared=len(system)))
    await running.aclose()
    assert len(system) == engine.prefix_cache_hits - hits
    assert await _uncached(checkpoint, prompt, 8) == answer


async def _uncached(checkpoint: Path, prompt: list[int], tokens: int) -> list[int]:
    """The greedy answer of an engine without a prefix cache (transformers' forward)."""
    plain = create_engine(
        BackendConfig(
            model_path=str(checkpoint), max_running=1, options={"forward": "transformers"}
        )
    )
    await plain.start()
    try:
        return await _all(plain, _request(prompt, tokens))  # type: ignore[arg-type]
    finally:
        await plain.close()


async def test_the_prefix_cache_can_be_turned_off(checkpoint: Path) -> None:
    """prefix_cache=off: a repeated prompt is prefilled again; any other value is refused."""
    config = BackendConfig(
        model_path=str(checkpoint), max_running=1, options={"prefix_cache": "off"}
    )
    engine = create_engine(config)
    await engine.start()
    try:
        prompt = list(range(40, 80))
        assert isinstance(engine, TorchEngine)
        await _all(engine, _request(prompt, 4, "conv"))
        await _all(engine, _request([*prompt, 1, 2], 4, "conv"))
        assert 0 == engine.prefix_cache_hits
    finally:
        await engine.close()
    with pytest.raises(ConfigError, match="prefix_cache"):
        create_engine(BackendConfig(model_path=str(checkpoint), options={"prefix_cache": "maybe"}))


async def test_compiled_decode_gives_the_same_tokens(checkpoint: Path) -> None:
    """compile=on: the decode step is compiled during start() (warm-up), and greedy
    answers alone and batched equal those of the engine without it."""
    answers = {}
    for switch in ("off", "on"):
        engine = create_engine(
            BackendConfig(
                model_path=str(checkpoint),
                max_running=2,
                dtype="float32",
                options={"compile": switch, "kv_cache_mb": "4"},
            )
        )
        await engine.start()
        try:
            assert isinstance(engine, TorchEngine)
            steps = engine.steps_executed
            alone = await _all(engine, _request([5, 6, 7], 12))
            assert engine.steps_executed - steps == 12  # no step runs twice for compiling
            together = await asyncio.gather(
                _all(engine, _request([5, 6, 7], 12)), _all(engine, _request([8, 9], 12))
            )
            answers[switch] = (alone, together)
        finally:
            await engine.close()
    assert answers["off"] == answers["on"]


async def test_weights_auto_takes_the_fastest_formats_here(torch_engine: Engine) -> None:
    """weights=auto (the default): the bundled GGUF's 4-bit layers run as int4 (one-row
    steps) on a CPU with native bf16 or AVX2, float elsewhere; the rest runs dense, in
    bf16 where the CPU has it natively, else in fbgemm's halves, else in float32."""
    from tokenwire_torch.llama import cpu_has_bf16

    assert isinstance(torch_engine, TorchEngine)
    bf16 = cpu_has_bf16()
    vector = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    dense = "bfloat16" if bf16 else "fp16" if cpu_has_fbgemm() else "float32"
    assert ("int4" if bf16 or vector else "float", dense) == (
        torch_engine.weights,
        torch_engine.dense_weights,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("weights", "int2"),
        ("compile", "yes"),
        ("quantized_rows", "0"),
        ("forward", "fast"),
        ("small_step_rows", "-1"),
        ("switch_interval_us", "0"),
    ],
)
def test_bad_engine_options_are_refused(checkpoint: Path, name: str, value: str) -> None:
    """Each option names its allowed values when given another."""
    with pytest.raises(ConfigError, match=name):
        create_engine(BackendConfig(model_path=str(checkpoint), options={name: value}))


async def test_weights_auto_falls_back_where_int4_cannot_pack(tmp_path: Path) -> None:
    """A model whose widths are not whole groups of 32 runs under weights=auto (float
    where int4 would have been chosen, fp16 where that is the choice anyway), and
    weights=int4 fails at start-up naming the reason."""
    from tokenwire_torch.llama import cpu_has_bf16

    ungrouped = tiny_llama(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=1,
        max_position_embeddings=64,
    )
    ungrouped.save_pretrained(tmp_path)
    auto = create_engine(BackendConfig(model_path=str(tmp_path), options={"kv_cache_mb": "4"}))
    await auto.start()
    try:
        assert isinstance(auto, TorchEngine)
        assert ("fp16" if cpu_has_fbgemm() and not cpu_has_bf16() else "float") == auto.weights
        assert await _all(auto, _request([1, 2, 3], 4))
    finally:
        await auto.close()
    forced = create_engine(
        BackendConfig(model_path=str(tmp_path), options={"weights": "int4", "kv_cache_mb": "4"})
    )
    with pytest.raises(ConfigError, match="groups of 32"):
        await forced.start()
    await forced.close()


def test_small_decode_steps_leave_a_core_to_the_event_loop() -> None:
    """Decode steps of at most small_step_rows rows run on one thread fewer; prompt
    chunks and bigger steps on all of them, whatever ran before."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        llama = LlamaForward(tiny_llama(seed=1, eos=False), slots=4, max_len=64)
        seen: list[tuple[int, int, int]] = []  # rows, width, threads of each pass
        forward = llama.forward

        def recording(slots: list[int], tokens: list[list[int]], positions: list[int]) -> object:
            seen.append((len(slots), len(tokens[0]), torch.get_num_threads()))
            return forward(slots, tokens, positions)

        llama.forward = recording  # type: ignore[assignment,method-assign]
        batcher = Batcher(llama, prefill_chunk=64, small_step_rows=2)
        rows = [batcher.new_row(i, [1, 2, 3], SamplingParams()) for i in range(3)]
        batcher.step(rows[:2])  # two prompts
        batcher.step(rows[:2])  # two decoding rows
        batcher.step(rows)  # the third prompt, then the two decoding
        batcher.step(rows)  # three decoding rows
    finally:
        torch.set_num_threads(before)
    assert seen == [(2, 3, 3), (2, 1, 2), (1, 3, 3), (2, 1, 2), (3, 1, 3)]


async def test_the_engine_lowers_the_gil_switch_interval(checkpoint: Path) -> None:
    """switch_interval_us lowers Python's GIL switch interval at start, never raises it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        for value, expected in (("250", 0.00025), ("1000", 0.00025)):
            engine = create_engine(
                BackendConfig(model_path=str(checkpoint), options={"switch_interval_us": value})
            )
            await engine.start()
            await engine.close()
            assert sys.getswitchinterval() == pytest.approx(expected)
    finally:
        sys.setswitchinterval(before)
