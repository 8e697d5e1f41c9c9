"""Browsers on the same protos: Connect and gRPC-Web against a live gateway, through httpx."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from google.protobuf import json_format

from tokenwire.auth import AuthConfig
from tokenwire.edge.config import HttpConfig
from tokenwire.proto.v1 import admin_pb2, chat_pb2, conversations_pb2, models_pb2
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

CHAT = "/tokenwire.v1.ChatService"
CONVERSATIONS = "/tokenwire.v1.ConversationService"
MODELS = "/tokenwire.v1.ModelService"
CONNECT_JSON = {"content-type": "application/json", "connect-protocol-version": "1"}


@asynccontextmanager
async def _gateway(
    backend: FakeBackend, **sections: Any
) -> AsyncIterator[tuple[RunningServer, httpx.AsyncClient]]:
    """A live gateway with the web edge on, and an HTTP client pointed at it."""
    http = HttpConfig(enabled=True, listen="127.0.0.1:0", **sections.pop("http", {}))
    async with running_server(backend, config_for_tests(http=http, **sections)) as running:
        assert running.server.http is not None
        base_url = f"http://127.0.0.1:{running.server.http.port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            yield running, client


def _frame(flags: int, payload: bytes) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def _frames(body: bytes) -> list[tuple[int, bytes]]:
    """Splits a gRPC-Web or Connect streaming body into (flags, payload) frames."""
    frames, at = [], 0
    while at < len(body):
        flags, length = struct.unpack(">BI", body[at : at + 5])
        frames.append((flags, body[at + 5 : at + 5 + length]))
        at += 5 + length
    return frames


def _trailers(payload: bytes) -> dict[str, str]:
    lines = payload.decode().split("\r\n")
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


def _events(frames: list[tuple[int, bytes]]) -> list[chat_pb2.CompleteResponse]:
    return [chat_pb2.CompleteResponse.FromString(p) for flags, p in frames if flags == 0]


async def test_connect_unary_json_lists_models() -> None:
    """ListModels over Connect JSON answers the proto3 JSON of ListModelsResponse."""
    async with _gateway(FakeBackend(model="fake-model")) as (_, client):
        response = await client.post(f"{MODELS}/ListModels", content=b"{}", headers=CONNECT_JSON)
    assert 200 == response.status_code
    assert "application/json" == response.headers["content-type"]
    reply = json_format.Parse(response.content, models_pb2.ListModelsResponse())
    assert "fake-model" in [model.name for model in reply.models]


async def test_connect_unary_proto_lists_conversations() -> None:
    """ListConversations over Connect proto returns the conversation a Complete started."""
    async with _gateway(FakeBackend(reply="Hi!")) as (running, client):
        events = [e async for e in running.chat.Complete(chat_pb2.CompleteRequest(message="yo"))]
        request = conversations_pb2.ListConversationsRequest(page_size=5)
        response = await client.post(
            f"{CONVERSATIONS}/ListConversations",
            content=request.SerializeToString(),
            headers={"content-type": "application/proto", "x-request-id": "web-req-1"},
        )
    assert 200 == response.status_code
    assert "web-req-1" == response.headers["x-request-id"]
    reply = conversations_pb2.ListConversationsResponse.FromString(response.content)
    expected = [events[0].started.conversation_id]
    assert expected == [conversation.id for conversation in reply.conversations]


async def test_connect_server_streaming_complete() -> None:
    """Complete over Connect streaming: started, deltas, finished, then an ok end-stream."""
    async with _gateway(FakeBackend(reply="Hello, browser.")) as (_, client):
        request = chat_pb2.CompleteRequest(message="Hi")
        response = await client.post(
            f"{CHAT}/Complete",
            content=_frame(0, request.SerializeToString()),
            headers={"content-type": "application/connect+proto", "connect-timeout-ms": "10000"},
        )
    assert 200 == response.status_code
    frames = _frames(response.content)
    events = _events(frames)
    assert "started" == events[0].WhichOneof("event")
    assert "Hello, browser." == "".join(e.delta.text for e in events if e.HasField("delta"))
    finished = events[-1].finished
    assert chat_pb2.FINISH_REASON_STOP == finished.finish_reason
    assert 0x02 == frames[-1][0]
    assert "error" not in json.loads(frames[-1][1])


async def test_connect_streaming_json_envelopes() -> None:
    """Connect+json carries each CompleteResponse as a JSON envelope."""
    async with _gateway(FakeBackend(reply="ok")) as (_, client):
        response = await client.post(
            f"{CHAT}/Complete",
            content=_frame(0, b'{"message": "Hi"}'),
            headers={"content-type": "application/connect+json"},
        )
    frames = _frames(response.content)
    events = [json.loads(p) for flags, p in frames if flags == 0]
    assert "started" in events[0]
    assert "ok" == "".join(e["delta"]["text"] for e in events if "delta" in e)
    assert "FINISH_REASON_STOP" == events[-1]["finished"]["finishReason"]
    assert {} == json.loads(frames[-1][1])


async def test_grpc_web_complete() -> None:
    """Complete over gRPC-Web: message frames, then a trailer frame with grpc-status 0."""
    async with _gateway(FakeBackend(reply="Hi there")) as (_, client):
        request = chat_pb2.CompleteRequest(message="Hi")
        response = await client.post(
            f"{CHAT}/Complete",
            content=_frame(0, request.SerializeToString()),
            headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
        )
    assert 200 == response.status_code
    assert response.headers["content-type"].startswith("application/grpc-web")
    assert response.headers["x-request-id"]
    frames = _frames(response.content)
    events = _events(frames)
    assert "Hi there" == "".join(e.delta.text for e in events if e.HasField("delta"))
    assert 0x80 == frames[-1][0]
    assert "0" == _trailers(frames[-1][1])["grpc-status"]


async def test_grpc_web_text_complete() -> None:
    """grpc-web-text: the request and each response chunk are base64 of the frames."""
    async with _gateway(FakeBackend(reply="Hey")) as (_, client):
        request = chat_pb2.CompleteRequest(message="Hi")
        body = base64.b64encode(_frame(0, request.SerializeToString()))
        response = await client.post(
            f"{CHAT}/Complete",
            content=body,
            headers={"content-type": "application/grpc-web-text"},
        )
    assert 200 == response.status_code
    assert response.headers["content-type"].startswith("application/grpc-web-text")
    raw = b"".join(
        base64.b64decode(chunk + b"=")
        for chunk in response.content.replace(b"=", b"=\n").split()
        if chunk
    )
    frames = _frames(raw)
    assert "Hey" == "".join(e.delta.text for e in _events(frames) if e.HasField("delta"))
    assert "0" == _trailers(frames[-1][1])["grpc-status"]


async def test_auth_refused_in_both_protocols() -> None:
    """Without credentials: Connect 401 unauthenticated, gRPC-Web grpc-status 16."""
    auth = AuthConfig(enabled=True, bootstrap_admin_key=False, key_cache_ttl_s=0.0)
    async with _gateway(FakeBackend(), auth=auth) as (_, client):
        connect = await client.post(
            f"{MODELS}/ListModels",
            content=b"{}",
            headers={**CONNECT_JSON, "authorization": "Bearer tw_not-a-key"},
        )
        request = chat_pb2.CompleteRequest(message="Hi")
        grpc_web = await client.post(
            f"{CHAT}/Complete",
            content=_frame(0, request.SerializeToString()),
            headers={"content-type": "application/grpc-web+proto"},
        )
    assert 401 == connect.status_code
    assert "unauthenticated" == connect.json()["code"]
    assert 200 == grpc_web.status_code
    assert "16" == _trailers(_frames(grpc_web.content)[-1][1])["grpc-status"]


async def test_authorization_header_is_call_metadata() -> None:
    """A browser's Authorization header authenticates the call: an admin key lists keys."""
    auth = AuthConfig(enabled=True, key_cache_ttl_s=0.0)
    async with _gateway(FakeBackend(), auth=auth) as (running, client):
        data_dir = Path(running.server.config.store.data_dir)
        secret = (data_dir / "admin.key").read_text().strip()
        request = admin_pb2.ListApiKeysRequest()
        response = await client.post(
            "/tokenwire.v1.AdminService/ListApiKeys",
            content=_frame(0, request.SerializeToString()),
            headers={
                "content-type": "application/grpc-web+proto",
                "authorization": f"Bearer {secret}",
            },
        )
    frames = _frames(response.content)
    assert "0" == _trailers(frames[-1][1])["grpc-status"]
    reply = admin_pb2.ListApiKeysResponse.FromString(frames[0][1])
    assert 1 == len(reply.keys)


async def test_abort_mid_stream_stops_the_engine() -> None:
    """A browser that aborts the fetch cancels the turn; the stored answer is incomplete."""
    backend = FakeBackend(reply="x", endless=True, token_delay_s=0.01)
    async with _gateway(backend) as (running, client):
        request = chat_pb2.CompleteRequest(message="go on forever")
        body = _frame(0, request.SerializeToString())
        headers = {"content-type": "application/connect+proto"}
        received = b""
        async with client.stream("POST", f"{CHAT}/Complete", content=body, headers=headers) as r:
            async for chunk in r.aiter_bytes():
                received += chunk
                if len(_frames_prefix(received)) >= 4:
                    break
        for _ in range(250):
            if backend.requests and backend.requests[-1].closed:
                break
            await asyncio.sleep(0.02)
        events = _events(_frames_prefix(received))
        messages = await running.conversations.ListMessages(
            conversations_pb2.ListMessagesRequest(conversation_id=events[0].started.conversation_id)
        )
    assert backend.requests[-1].closed
    answer = [m for m in messages.messages if m.role == "assistant"]
    assert 1 == len(answer)
    assert answer[0].complete is False
    seen = "".join(e.delta.text for e in events if e.HasField("delta"))
    assert answer[0].content.startswith(seen)


def _frames_prefix(body: bytes) -> list[tuple[int, bytes]]:
    """The whole frames at the start of a body cut anywhere."""
    frames, at = [], 0
    while at + 5 <= len(body):
        flags, length = struct.unpack(">BI", body[at : at + 5])
        if at + 5 + length > len(body):
            break
        frames.append((flags, body[at + 5 : at + 5 + length]))
        at += 5 + length
    return frames


async def test_connect_timeout_is_the_call_deadline() -> None:
    """Connect-Timeout-Ms bounds the call: the stream ends with deadline_exceeded."""
    backend = FakeBackend(reply="x", endless=True, token_delay_s=0.01)
    async with _gateway(backend) as (_, client):
        request = chat_pb2.CompleteRequest(message="Hi")
        response = await client.post(
            f"{CHAT}/Complete",
            content=_frame(0, request.SerializeToString()),
            headers={"content-type": "application/connect+proto", "connect-timeout-ms": "200"},
        )
    end = _frames(response.content)[-1]
    assert 0x02 == end[0]
    assert "deadline_exceeded" == json.loads(end[1])["error"]["code"]


async def test_connect_error_carries_status_details() -> None:
    """A refused turn's google.rpc details come through as Connect error details."""
    async with _gateway(FakeBackend(max_running=0)) as (_, client):
        response = await client.post(
            f"{CHAT}/Complete",
            content=_frame(0, chat_pb2.CompleteRequest(message="Hi").SerializeToString()),
            headers={"content-type": "application/connect+proto"},
        )
    error = json.loads(_frames(response.content)[-1][1])["error"]
    assert "resource_exhausted" == error["code"]
    assert ["google.rpc.RetryInfo"] == [d["type"] for d in error["details"]]


async def test_unsupported_connect_protocol_version_is_400() -> None:
    """A Connect-Protocol-Version other than 1 is refused as invalid_argument."""
    async with _gateway(FakeBackend()) as (_, client):
        headers = {**CONNECT_JSON, "connect-protocol-version": "2"}
        response = await client.post(f"{MODELS}/ListModels", content=b"{}", headers=headers)
    assert 400 == response.status_code
    assert "invalid_argument" == response.json()["code"]


async def test_unknown_method_is_404() -> None:
    """An unknown method: HTTP 404, Connect's unimplemented error or grpc-status 12."""
    async with _gateway(FakeBackend()) as (_, client):
        connect = await client.post(f"{MODELS}/NoSuchMethod", content=b"{}", headers=CONNECT_JSON)
        grpc_web = await client.post(
            f"{MODELS}/NoSuchMethod",
            content=_frame(0, b""),
            headers={"content-type": "application/grpc-web+proto"},
        )
    assert 404 == connect.status_code
    assert "unimplemented" == connect.json()["code"]
    assert 404 == grpc_web.status_code
    assert "12" == grpc_web.headers["grpc-status"]


async def test_other_paths_are_not_taken() -> None:
    """Paths outside the bridged packages stay with their own routes (POST /v1/models: 405)."""
    async with _gateway(FakeBackend()) as (_, client):
        response = await client.post("/v1/models", content=b"{}", headers=CONNECT_JSON)
    assert 405 == response.status_code


async def test_converse_is_refused() -> None:
    """Converse (bidirectional) is refused as unimplemented, pointing at Complete."""
    async with _gateway(FakeBackend()) as (_, client):
        response = await client.post(
            f"{CHAT}/Converse",
            content=_frame(0, b""),
            headers={"content-type": "application/connect+proto"},
        )
        grpc_web = await client.post(
            f"{CHAT}/Converse",
            content=_frame(0, b""),
            headers={"content-type": "application/grpc-web+proto"},
        )
    assert 501 == response.status_code
    error = response.json()
    assert "unimplemented" == error["code"]
    assert "Complete" in error["message"]
    assert "12" == grpc_web.headers["grpc-status"]


async def test_oversized_body_is_413() -> None:
    """A body over http.max_body_bytes is refused with 413 before any call is made."""
    backend = FakeBackend()
    async with _gateway(backend) as (_, client):
        request = chat_pb2.CompleteRequest(message="x" * ((1 << 20) + 16))
        response = await client.post(
            f"{CHAT}/Complete",
            content=_frame(0, request.SerializeToString()),
            headers={"content-type": "application/connect+proto"},
        )
    assert 413 == response.status_code
    assert [] == backend.requests


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/grpc-web+proto", b"\x00\x00\x00\x00\x09abc"),
        ("application/connect+proto", b"\x00\x00"),
        ("application/json", b"{not json"),
        ("application/proto", b"\xff\xff\xff"),
    ],
)
async def test_malformed_requests_are_400(content_type: str, body: bytes) -> None:
    """Broken frames, JSON or protobuf: HTTP 400, invalid_argument."""
    async with _gateway(FakeBackend()) as (_, client):
        path = f"{CHAT}/Complete" if "+" in content_type else f"{MODELS}/ListModels"
        response = await client.post(path, content=body, headers={"content-type": content_type})
    assert 400 == response.status_code
    if content_type.startswith("application/grpc-web"):
        assert "3" == response.headers["grpc-status"]
    else:
        assert "invalid_argument" == response.json()["code"]


async def test_cors_preflight_when_origins_are_set() -> None:
    """With http.cors_origins, a browser's preflight for a gRPC-Web call is allowed."""
    origin = "https://app.example"
    async with _gateway(FakeBackend(), http={"cors_origins": origin}) as (_, client):
        response = await client.options(
            f"{CHAT}/Complete",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-grpc-web,authorization",
            },
        )
    assert 200 == response.status_code
    assert origin == response.headers["access-control-allow-origin"]
