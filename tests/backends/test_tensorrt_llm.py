"""The TensorRT-LLM engine: the engine contract over a stand-in LLM API, options, the
missing-package error, a worker serving it, and (marked ``gpu``) the real runtime.

Most tests drive ``TensorRTLLMEngine`` over :mod:`tests.backends.trtllm_standin`,
an imitation of ``tensorrt_llm.LLM`` that needs no GPU. The ``gpu`` tests run
the real ``tensorrt_llm`` with the model named by ``TOKENWIRE_TRTLLM_MODEL`` (a
Hugging Face checkpoint directory or hub name, default
``Qwen/Qwen2.5-0.5B-Instruct``), and skip, saying why, without CUDA or the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from tokenwire_tensorrt_llm import EXTRA_HINT, LLMApi, TensorRTLLMEngine, api

from tests.backends.trtllm_standin import (
    EOS,
    STANDIN_API,
    StandInKvCacheConfig,
    StandInLLM,
    StandInSamplingParams,
    greedy_answer,
)
from tokenwire.backend import (
    BackendConfig,
    Engine,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    TokenizerSource,
    create_backend,
)
from tokenwire.errors import (
    ConfigError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from tokenwire.testing import running_worker
from tokenwire.testing.conformance import EngineConformance, collect

MODEL = "/models/stand-in"
BYTES = TokenizerSource(kind="bytes")
PROMPT = list(b"Say something.")


def standin_engine(
    options: Mapping[str, str] | None = None,
    *,
    max_running: int = 4,
    llm_api: LLMApi = STANDIN_API,
    **config: Any,
) -> TensorRTLLMEngine:
    """An engine over the stand-in LLM API, with the byte tokenizer for the gateway."""
    backend = BackendConfig(
        name="tensorrt-llm",
        model_path=MODEL,
        max_running=max_running,
        options=dict(options or {"stats_interval_ms": "20"}),
        **config,
    )
    return TensorRTLLMEngine(backend, llm_api=llm_api, tokenizer=BYTES)


def llm_of(engine: TensorRTLLMEngine) -> StandInLLM:
    """The stand-in LLM a started engine built."""
    llm = engine._llm
    assert isinstance(llm, StandInLLM)
    return llm


async def wait_for(condition: Any, limit_s: float = 5.0) -> None:
    """Until ``condition()`` is true, or fail after ``limit_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not so after {limit_s} s")


def request(
    prompt: list[int] = PROMPT, max_tokens: int = 8, request_id: str = "r1", **fields: Any
) -> GenerateRequest:
    """A greedy request unless ``sampling`` says otherwise."""
    return GenerateRequest(request_id, prompt, max_tokens, **fields)


@pytest.fixture(scope="module")
async def standin() -> AsyncIterator[TensorRTLLMEngine]:
    """One started engine over the stand-in, shared by the module's contract tests."""
    engine = standin_engine()
    await engine.start()
    yield engine
    await engine.close()


# -- the engine contract --------------------------------------------------------


class TestTensorRTLLMEngineOverStandIn(EngineConformance):
    """The conformance suite against the engine over the stand-in LLM API."""

    @pytest.fixture
    def engine(self, standin: TensorRTLLMEngine) -> Engine:
        return standin


async def test_greedy_tokens_are_the_runtimes_in_order_and_coalesced(
    standin: TensorRTLLMEngine,
) -> None:
    """The engine streams exactly the runtime's token ids; unread steps arrive as one chunk."""
    stream = standin.generate(request(max_tokens=12))
    first = await anext(stream)
    await asyncio.sleep(0.1)  # the runtime finishes while nobody reads
    rest = [chunk async for chunk in stream]
    tokens = [*first.token_ids, *(t for chunk in rest for t in chunk.token_ids)]
    assert greedy_answer(PROMPT, 12) == tokens
    assert (1, FinishReason.LENGTH, 12) == (
        len(rest),
        rest[-1].finish_reason,
        rest[-1].completion_tokens,
    )


async def test_aclose_aborts_the_request_in_the_runtime(standin: TensorRTLLMEngine) -> None:
    """Closing the stream aborts the request; the runtime drops it and load() is idle."""
    llm = llm_of(standin)
    aborted = len(llm.aborted_ids)
    stream = standin.generate(request(max_tokens=50))
    await anext(stream)
    await stream.aclose()
    assert (aborted + 1, 0, 0) == (len(llm.aborted_ids), llm.unfinished, standin.load().running)


async def test_close_ends_a_running_stream_with_unavailable() -> None:
    """close() aborts what runs; its consumer gets UNAVAILABLE, the LLM is shut down."""
    engine = standin_engine()
    await engine.start()
    llm = llm_of(engine)
    stream = engine.generate(request(max_tokens=50))
    await anext(stream)
    await engine.close()
    with pytest.raises(UnavailableError):
        await anext(stream)
    assert (0, True) == (llm.unfinished, llm._shut)


async def test_close_shuts_the_llm_down_off_the_event_loop() -> None:
    """LLM.shutdown blocks while the runtime's workers stop; the loop keeps running."""
    slow = LLMApi(
        functools.partial(StandInLLM, shutdown_s=0.3), StandInSamplingParams, StandInKvCacheConfig
    )
    engine = standin_engine(llm_api=slow)
    await engine.start()
    llm = llm_of(engine)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        await engine.close()
    finally:
        ticker.cancel()
    assert llm._shut
    assert ticks >= 10, f"the event loop ran {ticks} times in a 0.3 s shutdown"


async def test_tokens_made_before_a_runtime_failure_come_before_the_error() -> None:
    """A request the runtime fails on sends every token made before the failure, then
    INTERNAL, even when the consumer reads only after the failure."""
    failing = LLMApi(
        functools.partial(StandInLLM, fail_after=10), StandInSamplingParams, StandInKvCacheConfig
    )
    engine = standin_engine(llm_api=failing)
    await engine.start()
    received: list[int] = []
    stream = engine.generate(request(max_tokens=50))

    async def read_on() -> None:
        async for chunk in stream:
            received.extend(chunk.token_ids)

    try:
        received.extend((await anext(stream)).token_ids)
        await asyncio.sleep(0.1)  # the runtime makes the rest and fails while nobody reads
        with pytest.raises(InternalError):
            await read_on()
    finally:
        await engine.close()
    assert greedy_answer(PROMPT, 10) == received


async def test_more_than_max_running_is_refused_as_overloaded() -> None:
    """With max_running requests in flight, the next is RESOURCE_EXHAUSTED with a retry delay."""
    engine = standin_engine(max_running=1)
    await engine.start()
    try:
        stream = engine.generate(request(max_tokens=50))
        await anext(stream)
        with pytest.raises(ResourceExhaustedError) as refused:
            await collect(engine, request(request_id="r2"))
        await stream.aclose()
    finally:
        await engine.close()
    assert 1.0 == refused.value.retry_after_s


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "fragment"),
    [([], 4, "no tokens"), (PROMPT, 0, "max_tokens"), ([1] * 4096, 4, "context holds 4096")],
)
async def test_requests_the_engine_cannot_run_are_invalid(
    standin: TensorRTLLMEngine, prompt: list[int], max_tokens: int, fragment: str
) -> None:
    """An empty prompt, max_tokens < 1 or a prompt filling the context is INVALID_ARGUMENT."""
    with pytest.raises(InvalidArgumentError, match=fragment):
        await collect(standin, request(prompt, max_tokens))


# -- what the engine hands the LLM API --------------------------------------------


async def test_llm_gets_the_options_under_the_llm_api_names() -> None:
    """model_path and the options reach LLM(...) as BaseLlmArgs / TorchLlmArgs name them."""
    engine = standin_engine(
        {
            "tensor_parallel_size": "2",
            "pipeline_parallel_size": "2",
            "free_gpu_memory_fraction": "0.5",
            "max_seq_len": "1024",
            "tokenizer": "/models/tokenizer",
            "trust_remote_code": "on",
        },
        max_running=6,
        dtype="bfloat16",
    )
    await engine.start()
    try:
        llm = llm_of(engine)
    finally:
        await engine.close()
    assert {
        "tokenizer": "/models/tokenizer",
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "pipeline_parallel_size": 2,
        "trust_remote_code": True,
        "max_batch_size": 6,
        "kv_cache_config": StandInKvCacheConfig(
            free_gpu_memory_fraction=0.5, enable_block_reuse=True
        ),
        "max_seq_len": 1024,
        "enable_iter_perf_stats": True,
    } == llm.kwargs
    assert (MODEL, 1024, 6) == (
        llm.model,
        engine.capabilities.context_length,
        engine.capabilities.max_batch,
    )


async def test_sampling_params_map_token_ids_in_and_out(standin: TensorRTLLMEngine) -> None:
    """Greedy is top_k=1, no detokenizing, stop token ids and the length limit go through."""
    await collect(standin, request(max_tokens=5, stop_token_ids=frozenset({7, 3})))
    prompt, params, _ = llm_of(standin).submitted[-1]
    assert PROMPT == prompt
    assert (
        StandInSamplingParams(
            max_tokens=5, detokenize=False, stop_token_ids=[3, 7], top_k=1, end_id=EOS, pad_id=EOS
        )
        == params
    )


async def test_sampled_requests_carry_temperature_top_p_top_k_and_seed(
    standin: TensorRTLLMEngine,
) -> None:
    """Sampling params pass as they are; an unseeded request gets a random seed, not 0."""
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=99)
    await collect(standin, request(max_tokens=2, sampling=sampling))
    await collect(standin, request(max_tokens=2, sampling=SamplingParams(temperature=1.0)))
    seeded, unseeded = (params for _, params, _ in llm_of(standin).submitted[-2:])
    assert (0.7, 0.9, 40, 99) == (seeded.temperature, seeded.top_p, seeded.top_k, seeded.seed)
    assert (None, True) == (unseeded.top_k, unseeded.seed is not None)


async def test_end_and_pad_ids_come_from_the_options() -> None:
    """end_id and pad_id options set SamplingParams.end_id and pad_id; end_id also stops."""
    engine = standin_engine({"end_id": "33", "pad_id": "0"})
    await engine.start()
    try:
        await collect(engine, request(max_tokens=2))
        _, params, _ = llm_of(engine).submitted[-1]
        stops = engine._eos
    finally:
        await engine.close()
    assert (33, 0, frozenset({33})) == (params.end_id, params.pad_id, stops)


async def test_the_cache_scope_salts_block_reuse(standin: TensorRTLLMEngine) -> None:
    """A request's cache scope is its cache_salt; without one, the request is its own salt."""
    await collect(standin, request(max_tokens=1, cache_scope="conv-7"))
    await collect(standin, request(max_tokens=1, request_id="lonely"))
    salts = [salt for _, _, salt in llm_of(standin).submitted[-2:]]
    assert ["conv-7", "request:lonely"] == salts


async def test_an_llm_without_cache_salt_runs_without_block_reuse() -> None:
    """Where generate_async takes no cache_salt, block reuse is off and no salt is sent."""

    class OlderLLM(StandInLLM):
        def generate_async(  # type: ignore[override]
            self, inputs: Any, sampling_params: Any = None, streaming: bool = False
        ) -> Any:
            return super().generate_async(inputs, sampling_params, streaming=streaming)

    older = LLMApi(OlderLLM, StandInSamplingParams, StandInKvCacheConfig)
    engine = standin_engine(llm_api=older)
    await engine.start()
    try:
        await collect(engine, request(max_tokens=1, cache_scope="conv-7"))
        llm = llm_of(engine)
    finally:
        await engine.close()
    assert (False, None) == (llm.kwargs["kv_cache_config"].enable_block_reuse, llm.submitted[0][2])


async def test_a_stop_token_the_runtime_streams_is_cut_and_aborted() -> None:
    """Should the runtime stream a stop token, the engine ends with STOP there and aborts."""

    class NoStopLLM(StandInLLM):
        def generate_async(self, inputs: Any, sampling_params: Any = None, **kw: Any) -> Any:
            sampling_params.stop_token_ids = None  # the runtime ignores them
            return super().generate_async(inputs, sampling_params, **kw)

    engine = standin_engine(llm_api=LLMApi(NoStopLLM, StandInSamplingParams, StandInKvCacheConfig))
    reference = greedy_answer(PROMPT, 8)
    await engine.start()
    try:
        chunks = await collect(engine, request(stop_token_ids=frozenset({reference[4]})))
        llm = llm_of(engine)
    finally:
        await engine.close()
    tokens = [t for chunk in chunks for t in chunk.token_ids]
    cut = reference[: reference.index(reference[4])]
    assert (cut, FinishReason.STOP, 1, 0) == (
        tokens,
        chunks[-1].finish_reason,
        len(llm.aborted_ids),
        llm.unfinished,
    )


# -- load() from the runtime's iteration stats --------------------------------------


async def test_load_reads_queue_and_kv_cache_from_the_iteration_stats() -> None:
    """With one batch place, a second request shows as queued; KV use comes from the blocks."""
    one_place = LLMApi(
        functools.partial(StandInLLM, batch_limit=1, step_s=0.01),
        StandInSamplingParams,
        StandInKvCacheConfig,
    )
    engine = standin_engine(llm_api=one_place)
    await engine.start()
    streams = [engine.generate(request(max_tokens=60, request_id=f"r{i}")) for i in range(2)]
    try:
        await anext(streams[0])
        waiting = asyncio.ensure_future(anext(streams[1]))
        await wait_for(lambda: engine.load().queued == 1)
        report = engine.load()
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        for stream in streams:
            await stream.aclose()
        await engine.close()
    assert (1, 1, len(PROMPT)) == (report.running, report.queued, report.queued_tokens)
    assert 0 < report.kv_cache_usage <= 3 / 64  # the running request's blocks, of 64
    assert report.tokens_per_second > 0


async def test_stats_are_polled_in_the_background_not_per_load() -> None:
    """load() reads what the poller absorbed; it never asks the runtime itself."""
    engine = standin_engine()
    await engine.start()
    try:
        idle = engine._stats.iterations
        for _ in range(3):
            engine.load()
        unchanged = engine._stats.iterations
        await collect(engine, request(max_tokens=20))
        await wait_for(lambda: engine._stats.iterations > 0)
    finally:
        await engine.close()
    assert (0, 0) == (idle, unchanged)


# -- options, and choosing the backend without the package ------------------------


@pytest.mark.parametrize(
    ("options", "config", "fragment"),
    [
        ({"tensor_paralel_size": "2"}, {}, "unknown tensorrt-llm backend options"),
        ({"tensor_parallel_size": "0"}, {}, "tensor_parallel_size must be an integer >= 1"),
        ({"pipeline_parallel_size": "two"}, {}, "pipeline_parallel_size must be an integer"),
        ({"free_gpu_memory_fraction": "1.5"}, {}, "free_gpu_memory_fraction must be a number"),
        ({"runtime": "onnx"}, {}, "runtime must be one of"),
        ({"prefix_cache": "yes"}, {}, "prefix_cache must be one of"),
        ({"end_id": "-1"}, {}, "end_id must be an integer >= 0"),
        ({"stats_interval_ms": "1"}, {}, "stats_interval_ms must be an integer >= 10"),
        ({}, {"device": "cpu"}, "NVIDIA GPUs"),
        ({}, {"dtype": "int8"}, "invalid dtype"),
        ({}, {"max_running": 0}, "max_running must be >= 1"),
    ],
)
def test_invalid_options_are_config_errors(
    options: dict[str, str], config: dict[str, Any], fragment: str
) -> None:
    """Each bad setting is a ConfigError at construction that names it."""
    backend = BackendConfig(name="tensorrt-llm", model_path=MODEL, options=options, **config)
    with pytest.raises(ConfigError, match=fragment):
        create_backend(backend)


async def test_a_missing_model_path_is_a_config_error() -> None:
    """Without backend.model_path the engine refuses to start and says what to give."""
    engine = TensorRTLLMEngine(BackendConfig(name="tensorrt-llm"), llm_api=STANDIN_API)
    with pytest.raises(ConfigError, match=r"needs backend\.model_path"):
        await engine.start()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here"
)
async def test_choosing_the_backend_without_the_package_names_the_extra() -> None:
    """create_backend builds the engine; start() says to install the extra and needs a GPU."""
    engine = create_backend(BackendConfig(name="tensorrt-llm"))
    assert isinstance(engine, TensorRTLLMEngine)
    with pytest.raises(ConfigError) as refused:
        await engine.start()
    assert EXTRA_HINT in refused.value.message
    assert "NVIDIA GPU" in refused.value.message


async def test_without_a_cuda_gpu_start_names_the_requirement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the package but no CUDA device, start() says an NVIDIA GPU is needed."""
    monkeypatch.setattr(api, "_installed", lambda: True)
    monkeypatch.setattr(api, "_cuda_devices", lambda: 0)
    engine = create_backend(BackendConfig(name="tensorrt-llm", model_path=MODEL))
    with pytest.raises(ConfigError, match="NVIDIA GPU with CUDA; this machine has 0 CUDA"):
        await engine.start()  # type: ignore[union-attr]


def test_importing_the_package_imports_no_tensorrt_llm_or_torch() -> None:
    """The package and its factory load without tensorrt_llm or torch in sys.modules."""
    import subprocess
    import sys

    code = (
        "import sys, tokenwire_tensorrt_llm as t; from tokenwire.backend import BackendConfig;"
        "t.create_engine(BackendConfig(name='tensorrt-llm'));"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt_llm', 'torch')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (0, "[]") == (result.returncode, result.stdout.strip()), result.stderr


# -- a worker serving the engine ---------------------------------------------------


async def test_a_worker_serves_the_engine_over_the_vllm_engine_protocol() -> None:
    """Generate on a worker around the engine streams the runtime's tokens, then completes."""
    engine = standin_engine()
    generate = pb.GenerateRequest(
        request_id="w1",
        tokenized=pb.TokenizedInput(input_ids=PROMPT),
        sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=10),
        stream=True,
    )
    tokens: list[int] = []
    async with running_worker(engine) as worker:
        channel = grpc.aio.insecure_channel(worker.address)
        try:
            async for response in pb_grpc.VllmEngineStub(channel).Generate(generate):
                if response.HasField("chunk"):
                    tokens.extend(response.chunk.token_ids)
                else:
                    done = response.complete
        finally:
            await channel.close(None)
    assert greedy_answer(PROMPT, 10) == tokens
    assert ("length", len(PROMPT), 10) == (
        done.finish_reason,
        done.prompt_tokens,
        done.completion_tokens,
    )


# -- the real TensorRT-LLM, on a GPU ---------------------------------------------


def _gpu_problem() -> str | None:
    """Why the real runtime cannot run here, or None."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return f"tensorrt_llm is not installed ({EXTRA_HINT})"
    if api._cuda_devices() < 1:
        return "no CUDA GPU (the tensorrt-llm backend needs an NVIDIA GPU)"
    return None


GPU_MODEL = os.environ.get("TOKENWIRE_TRTLLM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
needs_gpu = pytest.mark.skipif(_gpu_problem() is not None, reason=str(_gpu_problem()))


@pytest.fixture(scope="module")
async def real_engine() -> AsyncIterator[TensorRTLLMEngine]:
    """The real TensorRT-LLM (PyTorch runtime) with a small model, loaded once."""
    options = {"free_gpu_memory_fraction": "0.3", "max_seq_len": "2048"}
    config = BackendConfig(name="tensorrt-llm", model_path=GPU_MODEL, options=options)
    engine = create_backend(config)
    assert isinstance(engine, TensorRTLLMEngine)
    await engine.start()
    yield engine
    await engine.close()


@pytest.mark.gpu
@needs_gpu
class TestTensorRTLLMEngineOnGpu(EngineConformance):
    """The conformance suite against the real TensorRT-LLM on a CUDA GPU."""

    settle_s = 10.0

    @pytest.fixture
    def engine(self, real_engine: TensorRTLLMEngine) -> Engine:
        return real_engine

    @pytest.fixture
    def prompt_ids(self, real_engine: TensorRTLLMEngine) -> list[int]:
        """A chat prompt with a long answer, from the model's own tokenizer."""
        from transformers import AutoTokenizer

        source = real_engine.capabilities.tokenizer
        assert source is not None
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        messages = [{"role": "user", "content": "Count from one to fifty in words."}]
        ids: list[int] = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return ids


@pytest.mark.gpu
@needs_gpu
async def test_the_real_runtime_reports_stats_and_kv_cache_use(
    real_engine: TensorRTLLMEngine,
) -> None:
    """After a request, the runtime's iteration stats have reached load()."""
    await collect(real_engine, request([1, 2, 3, 4], max_tokens=32))
    await wait_for(lambda: real_engine._stats.iterations > 0, limit_s=10.0)
    report = real_engine.load()
    assert 0.0 <= report.kv_cache_usage <= 1.0
    assert (0, 0) == (report.running, report.queued)


@pytest.mark.gpu
@needs_gpu
async def test_a_worker_serves_the_real_runtime(real_engine: TensorRTLLMEngine) -> None:
    """A worker around the real engine answers Generate with tokens and a completion."""
    from tokenwire.testing import BorrowedEngine

    generate = pb.GenerateRequest(
        request_id="g1",
        tokenized=pb.TokenizedInput(input_ids=[1, 2, 3, 4]),
        sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=8),
        stream=True,
    )
    async with running_worker(BorrowedEngine(real_engine)) as worker:
        channel = grpc.aio.insecure_channel(worker.address)
        try:
            responses = [r async for r in pb_grpc.VllmEngineStub(channel).Generate(generate)]
        finally:
            await channel.close(None)
    assert responses[-1].HasField("complete")
    assert 0 < responses[-1].complete.completion_tokens <= 8
