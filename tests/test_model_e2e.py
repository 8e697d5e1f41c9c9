"""End to end with the real model: SmolLM2-135M-Instruct through a real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import wait_until
from tests.test_chat_service import next_event, start, text_of
from tokenwire.backend import ChatMessage, Engine, FinishReason, GenerateRequest
from tokenwire.model.tokenizers import Tokenizer, load_tokenizer
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import BorrowedEngine, RunningServer, running_server
from tokenwire.testing.conformance import EngineConformance

pytestmark = pytest.mark.model

FRANCE = "What is the capital of France?"
_FINISH = {
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
}


@pytest.fixture
async def model_server(torch_engine: Engine) -> RunningServer:
    """A server answering with the session's real model."""
    async with running_server(BorrowedEngine(torch_engine)) as running:
        yield running  # type: ignore[misc]


async def model_tokenizer(engine: Engine) -> Tokenizer:
    """The tokenizer and chat template the engine's capabilities name (cached once loaded)."""
    source = engine.capabilities.tokenizer
    assert source is not None
    return await asyncio.to_thread(load_tokenizer, source)


async def test_real_model_streams_an_answer_naming_paris(
    model_server: RunningServer, torch_engine: Engine
) -> None:
    """A greedy turn names Paris with exactly the text, counts and finish of the engine alone."""
    request = chat_pb2.CompleteRequest(
        message=FRANCE, params=chat_pb2.SamplingParams(temperature=0, max_tokens=24)
    )
    events = [event async for event in model_server.chat.Complete(request)]
    deltas = [e.delta for e in events if e.HasField("delta")]
    # The same question straight to the engine: the server must add and lose nothing.
    tokenizer = await model_tokenizer(torch_engine)
    prompt = tokenizer.encode_chat([ChatMessage("user", FRANCE)])
    direct = GenerateRequest("direct", prompt, 24, stop_token_ids=tokenizer.eos_token_ids)
    chunks = [chunk async for chunk in torch_engine.generate(direct)]
    tokens = [token for chunk in chunks for token in chunk.token_ids]
    step = tokenizer.detokenizer().step
    assert "".join(step(token) for token in tokens) == text_of(events)
    assert "Paris" in text_of(events)
    assert "<|im_end|>" not in text_of(events)
    assert len(deltas) > 1  # streamed, not sent in one piece
    finished = events[-1].finished
    assert (_FINISH[chunks[-1].finish_reason], len(prompt), len(tokens), len(tokens)) == (
        finished.finish_reason,
        finished.usage.prompt_tokens,
        finished.usage.completion_tokens,
        sum(d.token_count for d in deltas),
    )


async def test_real_model_converse_remembers_the_first_turn(
    model_server: RunningServer, torch_engine: Engine
) -> None:
    """On one Converse stream the second turn's prompt is the first exchange plus the question."""
    call = model_server.chat.Converse()
    params = chat_pb2.SamplingParams(max_tokens=8)
    await call.write(start(FRANCE, params=params))
    conversation = (await next_event(call, "started")).started.conversation_id
    first_events = await events_until_finished(call)
    await call.write(start("And of Italy?", conversation_id=conversation, params=params))
    second = (await events_until_finished(call))[-1].finished
    await call.done_writing()
    assert grpc.StatusCode.OK == await call.code()
    tokenizer = await model_tokenizer(torch_engine)
    history = [
        ChatMessage("user", FRANCE),
        ChatMessage("assistant", text_of(first_events)),
        ChatMessage("user", "And of Italy?"),
    ]
    assert len(tokenizer.encode_chat(history)) == second.usage.prompt_tokens


async def events_until_finished(call: grpc.aio.StreamStreamCall) -> list[chat_pb2.ConverseResponse]:
    """Read a Converse stream's events up to and including the next TurnFinished."""
    events: list[chat_pb2.ConverseResponse] = []
    while True:
        event = await asyncio.wait_for(call.read(), 60)
        assert event is not grpc.aio.EOF, "stream ended before a finished event"
        events.append(event)
        if event.WhichOneof("event") == "finished":
            return events


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
    from tokenwire.model.tokenizers import load_tokenizer
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
