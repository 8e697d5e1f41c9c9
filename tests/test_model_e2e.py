"""End to end with the real model: SmolLM2-135M-Instruct through a real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import wait_until
from tests.test_chat_service import next_event, start, text_of
from tokenwire.backend import Engine
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import BorrowedEngine, RunningServer, running_server
from tokenwire.testing.conformance import EngineConformance

pytestmark = pytest.mark.model

FRANCE = "What is the capital of France?"


@pytest.fixture
async def model_server(torch_engine: Engine) -> RunningServer:
    """A server answering with the session's real model."""
    async with running_server(BorrowedEngine(torch_engine)) as running:
        yield running  # type: ignore[misc]


async def test_real_model_streams_an_answer_naming_paris(model_server: RunningServer) -> None:
    """A greedy turn about France streams several deltas that name Paris."""
    request = chat_pb2.CompleteRequest(
        message=FRANCE, params=chat_pb2.SamplingParams(temperature=0, max_tokens=24)
    )
    events = [event async for event in model_server.chat.Complete(request)]
    deltas = [e.delta for e in events if e.HasField("delta")]
    assert "Paris" in text_of(events)
    assert len(deltas) > 1
    finished = events[-1].finished
    assert finished.finish_reason in (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)
    assert sum(d.token_count for d in deltas) <= finished.usage.completion_tokens <= 24
    assert finished.usage.prompt_tokens > 10  # the model's own chat template was applied
    assert "<|im_end|>" not in text_of(events)


async def test_real_model_converse_remembers_the_first_turn(model_server: RunningServer) -> None:
    """On one Converse stream the second turn's prompt holds the first turn's exchange."""
    call = model_server.chat.Converse()
    params = chat_pb2.SamplingParams(max_tokens=8)
    await call.write(start(FRANCE, params=params))
    conversation = (await next_event(call, "started")).started.conversation_id
    first = (await next_event(call, "finished")).finished
    await call.write(start("And of Italy?", conversation_id=conversation, params=params))
    second = (await next_event(call, "finished")).finished
    await call.done_writing()
    assert grpc.StatusCode.OK == await call.code()
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


async def test_real_model_cancel_stops_decoding(
    model_server: RunningServer, torch_engine: Engine
) -> None:
    """Cancelling mid-answer stops the torch engine within a decode step."""
    request = chat_pb2.CompleteRequest(
        message="Write a long story about a dragon.",
        params=chat_pb2.SamplingParams(max_tokens=200),
    )
    call = model_server.chat.Complete(request)
    async for event in call:
        if event.HasField("delta"):
            break
    call.cancel()
    await wait_until(lambda: torch_engine.load().running == 0, limit_s=10)
    steps = torch_engine.steps_executed  # type: ignore[attr-defined]
    await asyncio.sleep(0.3)
    assert steps == torch_engine.steps_executed  # type: ignore[attr-defined]


def test_real_tokenizer_never_splits_a_character() -> None:
    """Incremental detokenizing of real SmolLM2 tokens yields whole characters only."""
    from tokenwire.backend import TokenizerSource
    from tokenwire.tokenizers import load_tokenizer
    from tokenwire_torch.source import default_model_file

    path = default_model_file()
    tokenizer = load_tokenizer(TokenizerSource(path=str(path.parent), gguf_file=path.name))
    text = "naïve café, 世界, Ελλάδα, 🎉🚀 and ½ — done"
    step = tokenizer.detokenizer().step
    pieces = [step(t) for t in tokenizer.encode(text)]
    assert text == "".join(pieces)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some tokens are partial characters and were held back


class TestTorchEngineConformance(EngineConformance):
    """The torch engine passes the framework's engine conformance suite."""

    @pytest.fixture
    def engine(self, torch_engine: Engine) -> Engine:
        return torch_engine
