"""The real model on a worker: the gateway fetches its tokenizer and answers through it."""

from __future__ import annotations

import pytest

from tokenwire.backend import Engine
from tokenwire.proto.v1 import chat_pb2
from tokenwire.router.config import RouterConfig
from tokenwire.router.engine import RoutedEngine
from tokenwire.testing import BorrowedEngine, config_for_tests, running_server, running_worker

pytestmark = pytest.mark.model

FRANCE = "What is the capital of France?"


async def test_a_gateway_answers_with_the_model_of_its_worker(
    torch_engine: Engine, tmp_path: object
) -> None:
    """Through a worker, a greedy turn gives the same text as the engine in the gateway,
    with the tokenizer the worker sent (the gateway has no model files)."""
    request = chat_pb2.CompleteRequest(
        message=FRANCE, params=chat_pb2.SamplingParams(temperature=0, max_tokens=16)
    )
    async with running_server(BorrowedEngine(torch_engine)) as local:
        here = [e async for e in local.chat.Complete(request)]
    async with running_worker(BorrowedEngine(torch_engine), token="t0ken") as worker:
        router = RouterConfig(
            workers=worker.address, token="t0ken", tokenizer_cache_dir=str(tmp_path)
        )
        engine = RoutedEngine(router)
        async with running_server(engine, config_for_tests(router=router)) as gateway:
            remote = [e async for e in gateway.chat.Complete(request)]
            source = engine.capabilities.tokenizer
    text = "".join(e.delta.text for e in remote if e.HasField("delta"))
    assert "Paris" in text
    assert "".join(e.delta.text for e in here if e.HasField("delta")) == text
    assert here[-1].finished.usage.prompt_tokens == remote[-1].finished.usage.prompt_tokens
    assert source is not None
    assert source.path.startswith(str(tmp_path))
    assert not source.gguf_file
