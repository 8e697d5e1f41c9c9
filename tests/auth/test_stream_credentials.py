"""A long-lived Converse stream checks its credential again before every turn."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from tests.auth.conftest import SigningKeys, auth_config, bearer, make_token
from tokenwire.auth import IssuedKey, SQLiteKeyStore
from tokenwire.auth.config import AuthConfig
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.interceptors import ErrorsInterceptor
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import FakeBackend, running_server


def _start(message: str) -> chat_pb2.ConverseRequest:
    return chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message=message))


async def _until_end(call: grpc.aio.StreamStreamCall[Any, Any]) -> chat_pb2.ConverseResponse:
    """Read until the turn's last event: TurnFinished or TurnError."""
    while True:
        event = await asyncio.wait_for(call.read(), 10)
        assert event is not grpc.aio.EOF, "stream ended before the turn did"
        if event.WhichOneof("event") in ("finished", "error"):
            return event


async def test_a_key_revoked_mid_stream_stops_the_next_turn(
    key_store: SQLiteKeyStore, alice_key: IssuedKey
) -> None:
    """With a 0.2 s key cache, a turn started 0.3 s after revocation is UNAUTHENTICATED."""
    auth = AuthInterceptor(auth_config(key_cache_ttl_s=0.2), "", key_store=key_store)
    async with running_server(
        FakeBackend(reply="Hi!"), interceptors=[ErrorsInterceptor(), auth]
    ) as running:
        call = running.chat.Converse(metadata=bearer(alice_key.secret))
        await call.write(_start("first"))
        first = await _until_end(call)
        await key_store.revoke_key(alice_key.key.id)  # straight to the store, not the cache
        await asyncio.sleep(0.3)
        await call.write(_start("second"))
        second = await _until_end(call)
        await call.done_writing()
        code = await call.code()
    assert "finished" == first.WhichOneof("event")
    assert "error" == second.WhichOneof("event")
    assert grpc.StatusCode.UNAUTHENTICATED.value[0] == second.error.code
    assert "revoked" in second.error.message
    assert grpc.StatusCode.OK == code  # the stream stays open; only the turn is refused


async def test_an_expired_token_stops_the_next_turn(
    key_store: SQLiteKeyStore,
    signing_keys: SigningKeys,
    jwt_config: Callable[..., AuthConfig],
) -> None:
    """A JWT that expires while its stream is open refuses the turn after its exp."""
    auth = AuthInterceptor(jwt_config(), "", key_store=key_store)
    token = make_token(signing_keys.rsa_private, "RS256", kid="rsa1", expires_in=2.0)
    async with running_server(
        FakeBackend(reply="Hi!"), interceptors=[ErrorsInterceptor(), auth]
    ) as running:
        call = running.chat.Converse(metadata=bearer(token))
        await call.write(_start("first"))
        first = await _until_end(call)
        await asyncio.sleep(2.2)
        await call.write(_start("second"))
        second = await _until_end(call)
        await call.done_writing()
    assert "finished" == first.WhichOneof("event")
    assert grpc.StatusCode.UNAUTHENTICATED.value[0] == second.error.code


async def test_two_authorization_headers_are_refused(
    key_store: SQLiteKeyStore, alice_key: IssuedKey
) -> None:
    """A call carrying two authorization headers is UNAUTHENTICATED, even if the first is good."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    async with running_server(FakeBackend(), interceptors=[ErrorsInterceptor(), auth]) as running:
        metadata = (*bearer(alice_key.secret), *bearer("tw_not_a_real_key"))
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="hi"), metadata=metadata)
        code = await call.code()
        details = await call.details()
    assert grpc.StatusCode.UNAUTHENTICATED == code
    assert "one authorization header" in details
