"""The OpenAI-compatible HTTP API, driven by the official openai SDK against a live gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest

from tokenwire.auth.config import AuthConfig
from tokenwire.auth.keys import make_principal
from tokenwire.edge.config import HttpConfig
from tokenwire.moderation import ModerationConfig
from tokenwire.quotas import PlanLimits, QuotaConfig
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

FLAGGED_INPUT = "Listen: I w1ll K.I.L.L you tomorrow."
FLAGGED_REPLY = "Sure. Here it is: I will kill you now, said the villain."
HI = [{"role": "user", "content": "Hi"}]


@dataclasses.dataclass
class Gateway:
    """A running gateway with its HTTP edge, an API key and an SDK client using it."""

    running: RunningServer
    backend: FakeBackend
    key: str
    base_url: str
    client: openai.AsyncOpenAI
    store: SQLiteConversationStore


@asynccontextmanager
async def gateway(backend: FakeBackend | None = None, **sections: Any) -> AsyncIterator[Gateway]:
    backend = backend or FakeBackend(reply="Hello there.")
    sections.setdefault("moderation", ModerationConfig(enabled=False))
    config = config_for_tests(
        http=HttpConfig(enabled=True, listen="127.0.0.1:0"),
        auth=AuthConfig(enabled=True, api_keys=True),
        **sections,
    )
    store = SQLiteConversationStore(":memory:")
    async with running_server(backend, config, store=store) as running:
        assert running.server.http is not None
        issued = await running.server.pipeline.auth.key_store.create_key(  # type: ignore[union-attr]
            make_principal("acme", "ann")
        )
        base_url = f"http://127.0.0.1:{running.server.http.port}/v1"
        client = openai.AsyncOpenAI(base_url=base_url, api_key=issued.secret, max_retries=0)
        try:
            yield Gateway(running, backend, issued.secret, base_url, client, store)
        finally:
            await client.close()


async def test_streamed_completion_with_usage() -> None:
    """stream=True with include_usage: role chunk, text chunks, finish 'stop', then usage."""
    async with gateway() as gw:
        stream = await gw.client.chat.completions.create(
            model="fake", messages=HI, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Hello there." == text
    assert "stop" == [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert [] == chunks[-1].choices
    usage = chunks[-1].usage
    assert usage is not None
    assert (len("<|user|>Hi\n<|assistant|>"), len(text)) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens
    assert "chat.completion.chunk" == chunks[0].object


async def test_non_streamed_completion_with_usage_and_conversation() -> None:
    """stream=False: one chat.completion with the text, usage and the conversation's id."""
    async with gateway() as gw:
        raw = await gw.client.chat.completions.with_raw_response.create(model="fake", messages=HI)
        answer = raw.parse()
    assert "Hello there." == answer.choices[0].message.content
    assert ("stop", "assistant") == (
        answer.choices[0].finish_reason,
        answer.choices[0].message.role,
    )
    assert answer.usage is not None
    assert len("Hello there.") == answer.usage.completion_tokens
    conversation_id = (answer.model_extra or {})["conversation_id"]
    assert conversation_id
    assert conversation_id == raw.headers["x-tokenwire-conversation-id"]


async def test_max_tokens_ends_with_length() -> None:
    """max_tokens cuts the answer: finish_reason 'length'."""
    async with gateway() as gw:
        answer = await gw.client.chat.completions.create(model="fake", messages=HI, max_tokens=3)
    assert ("Hel", "length") == (answer.choices[0].message.content, answer.choices[0].finish_reason)


async def test_list_models() -> None:
    """GET /v1/models lists the served models from ModelService."""
    async with gateway() as gw:
        models = [model async for model in gw.client.models.list()]
    assert ["fake"] == [model.id for model in models]


async def test_refused_without_a_key() -> None:
    """No or a wrong API key: 401, AuthenticationError, code invalid_api_key."""
    async with gateway() as gw:
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key="tw_nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model="fake", messages=HI)
        await client.close()
        async with httpx.AsyncClient() as http:
            bare = await http.get(f"{gw.base_url}/models")
    assert "invalid_api_key" == refused.value.code
    assert (401, "invalid_api_key") == (bare.status_code, bare.json()["error"]["code"])
    assert [] == gw.backend.requests


async def test_refused_over_quota_with_retry_after() -> None:
    """Over requests_per_minute: 429, RateLimitError, with Retry-After."""
    quotas = QuotaConfig(plans={"default": PlanLimits(requests_per_minute=1)})
    async with gateway(quotas=quotas) as gw:
        await gw.client.chat.completions.create(model="fake", messages=HI)
        with pytest.raises(openai.RateLimitError) as refused:
            await gw.client.chat.completions.create(model="fake", messages=HI)
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert "rate_limit_error" == refused.value.type
    assert refused.value.code  # the gateway's error type, e.g. quota_exceeded


async def test_a_flagged_answer_ends_with_content_filter() -> None:
    """Output moderation cuts the answer: finish_reason content_filter, the term never sent."""
    backend = FakeBackend(reply=FLAGGED_REPLY)
    async with gateway(backend, moderation=ModerationConfig()) as gw:
        answer = await gw.client.chat.completions.create(model="fake", messages=HI)
        stream = await gw.client.chat.completions.create(model="fake", messages=HI, stream=True)
        chunks = [chunk async for chunk in stream]
    assert "content_filter" == answer.choices[0].finish_reason
    assert "kill" not in (answer.choices[0].message.content or "")
    assert "content_filter" == chunks[-1].choices[0].finish_reason


async def test_a_flagged_message_is_refused_before_the_model() -> None:
    """Input moderation: 400 with code content_filter; the engine never runs."""
    async with gateway(moderation=ModerationConfig()) as gw:
        with pytest.raises(openai.BadRequestError) as refused:
            await gw.client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": FLAGGED_INPUT}]
            )
    assert "content_filter" == refused.value.code
    assert [] == gw.backend.requests


async def test_conversation_id_continues_a_stored_conversation() -> None:
    """conversation_id: the stored history is the context; the client's copy is not sent."""
    backend = FakeBackend(reply="ok")
    async with gateway(backend) as gw:
        first = await gw.client.chat.completions.create(model="fake", messages=HI)
        conversation_id = (first.model_extra or {})["conversation_id"]
        second = await gw.client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "ignored"}, {"role": "user", "content": "Again"}],
            extra_body={"conversation_id": conversation_id},
        )
    assert conversation_id == (second.model_extra or {})["conversation_id"]
    prompt = bytes(backend.requests[-1].request.prompt_token_ids).decode()
    assert "<|user|>Hi\n<|assistant|>ok\n<|user|>Again\n<|assistant|>" == prompt


async def test_earlier_messages_reach_the_model() -> None:
    """Without conversation_id the request's system, user and assistant messages are the context."""
    backend = FakeBackend(reply="ok")
    async with gateway(backend) as gw:
        await gw.client.chat.completions.create(
            model="fake",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": "Bye"},
            ],
        )
    prompt = bytes(backend.requests[-1].request.prompt_token_ids).decode()
    expected = "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello\n<|user|>Bye\n<|assistant|>"
    assert expected == prompt


async def test_a_disconnect_mid_stream_stops_the_engine() -> None:
    """Closing the stream cancels the call: the engine stops, the stored answer is incomplete."""
    backend = FakeBackend(reply="x", endless=True, token_delay_s=0.01)
    async with gateway(backend) as gw:
        headers = {"authorization": f"Bearer {gw.key}"}
        body = {"model": "fake", "messages": HI, "stream": True}
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream("POST", f"{gw.base_url}/chat/completions", json=body, headers=headers) as r,
        ):
            conversation_id = r.headers["x-tokenwire-conversation-id"]
            async for line in r.aiter_lines():
                if '"content":"x' in line:
                    break
        for _ in range(200):
            if backend.requests[-1].closed:
                break
            await asyncio.sleep(0.01)
        steps = backend.steps_executed
        await asyncio.sleep(0.1)
        owner = "acme/ann"
        messages = await gw.store.list_messages(owner, conversation_id)
    assert backend.requests[-1].closed
    assert steps == backend.steps_executed  # no step after the close
    assert ["user", "assistant"] == [m.role for m in messages]
    assert not messages[-1].complete


async def test_a_client_leaving_a_non_streamed_answer_stops_the_engine() -> None:
    """stream=False too: a client that gives up cancels the call and the engine stops."""
    backend = FakeBackend(reply="x", endless=True, token_delay_s=0.01)
    async with gateway(backend) as gw, httpx.AsyncClient(timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                f"{gw.base_url}/chat/completions",
                json={"model": "fake", "messages": HI},
                headers={"authorization": f"Bearer {gw.key}"},
            )
        for _ in range(200):
            if backend.requests and backend.requests[-1].closed:
                break
            await asyncio.sleep(0.01)
        assert backend.requests[-1].closed


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[]", None),
        (json.dumps({"model": "fake"}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), "messages[0].role"),
        (json.dumps({"messages": HI, "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({"messages": HI, "stop": [1]}).encode(), "stop"),
        (
            json.dumps({"messages": [*HI, {"role": "assistant", "content": "x"}]}).encode(),
            "messages[1]",
        ),
    ],
)
async def test_bad_requests_are_400(body: bytes, param: str | None) -> None:
    """Bad JSON, missing messages, unknown roles, bad types: 400 invalid_request_error."""
    async with gateway() as gw, httpx.AsyncClient() as http:
        answer = await http.post(
            f"{gw.base_url}/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {gw.key}", "content-type": "application/json"},
        )
    assert 400 == answer.status_code
    assert ("invalid_request_error", param) == (
        answer.json()["error"]["type"],
        answer.json()["error"]["param"],
    )


async def test_gateway_limits_are_400_and_bodies_over_the_limit_413() -> None:
    """A temperature out of range is the gateway's INVALID_ARGUMENT; a huge body is 413."""
    async with gateway() as gw:
        with pytest.raises(openai.BadRequestError) as refused:
            await gw.client.chat.completions.create(model="fake", messages=HI, temperature=5)
        async with httpx.AsyncClient() as http:
            big = await http.post(
                f"{gw.base_url}/chat/completions",
                content=b" " * (HttpConfig().max_body_bytes + 1),
                headers={"authorization": f"Bearer {gw.key}"},
            )
    assert "temperature" in refused.value.message
    assert 413 == big.status_code


async def test_an_unknown_model_is_404() -> None:
    """A model the gateway does not serve: NotFoundError."""
    async with gateway() as gw:
        with pytest.raises(openai.NotFoundError):
            await gw.client.chat.completions.create(model="nope", messages=HI)


async def test_a_failure_mid_stream_ends_with_an_error_event() -> None:
    """The engine failing after the first tokens: the SSE stream ends with an error event."""
    backend = FakeBackend(reply="Hello there.", fail_after=3, token_delay_s=0.001)
    async with gateway(backend) as gw:
        stream = await gw.client.chat.completions.create(model="fake", messages=HI, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
