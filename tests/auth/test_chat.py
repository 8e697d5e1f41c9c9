"""Auth in front of the real chat server: Complete and Converse run as the caller."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.auth.conftest import SigningKeys, auth_config, bearer, make_token
from tokenwire.auth import IssuedKey, SQLiteKeyStore, make_principal
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.interceptors import ErrorsInterceptor
from tokenwire.proto.v1 import chat_pb2, models_pb2
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import FakeBackend, running_server


def _start(message: str, conversation_id: str = "") -> chat_pb2.ConverseRequest:
    turn = chat_pb2.StartTurn(message=message, conversation_id=conversation_id)
    return chat_pb2.ConverseRequest(start=turn)


async def _until(call: grpc.aio.StreamStreamCall, kind: str) -> chat_pb2.ConverseResponse:
    while True:
        event = await asyncio.wait_for(call.read(), 10)
        assert event is not grpc.aio.EOF, f"stream ended before a {kind} event"
        if event.WhichOneof("event") == kind:
            return event


async def test_complete_and_converse_run_as_the_key_s_principal(
    key_store: SQLiteKeyStore, alice_key: IssuedKey
) -> None:
    """A conversation started with alice's key is owned by acme/alice and hidden from bob."""
    bob = await key_store.create_key(make_principal("acme", "bob"))
    store = SQLiteConversationStore(":memory:")
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    async with running_server(
        FakeBackend(reply="Hi!"), store=store, interceptors=[ErrorsInterceptor(), auth]
    ) as running:
        events = [
            e
            async for e in running.chat.Complete(
                chat_pb2.CompleteRequest(message="Hello"), metadata=bearer(alice_key.secret)
            )
        ]
        conversation_id = events[0].started.conversation_id
        owned = await store.get_conversation("acme/alice", conversation_id)

        call = running.chat.Converse(metadata=bearer(alice_key.secret))
        await call.write(_start("again", conversation_id))
        await _until(call, "finished")
        await call.done_writing()
        assert grpc.StatusCode.OK == await call.code()

        foreign = running.chat.Converse(metadata=bearer(bob.secret))
        await foreign.write(_start("let me in", conversation_id))
        error = (await _until(foreign, "error")).error
        await foreign.done_writing()
        messages = await store.list_messages("acme/alice", conversation_id)
    assert conversation_id == owned.id
    assert ["Hello", "Hi!", "again", "Hi!"] == [m.content for m in messages]
    assert grpc.StatusCode.NOT_FOUND.value[0] == error.code


async def test_a_jwt_caller_owns_their_conversation(
    key_store: SQLiteKeyStore, signing_keys: SigningKeys
) -> None:
    """A JWT's tenant and subject become the owner of the conversation it starts."""
    config = auth_config(
        jwt_key_file=str(signing_keys.rsa_public_pem),
        jwt_issuer="https://idp.test/",
        jwt_audience="tokenwire",
    )
    token = make_token(signing_keys.rsa_private, "RS256", claims={"sub": "carol"})
    store = SQLiteConversationStore(":memory:")
    auth = AuthInterceptor(config, "", key_store=key_store)
    async with running_server(
        FakeBackend(), store=store, interceptors=[ErrorsInterceptor(), auth]
    ) as running:
        request = chat_pb2.CompleteRequest(message="Hello")
        events = [e async for e in running.chat.Complete(request, metadata=bearer(token))]
        conversation = await store.get_conversation("acme/carol", events[0].started.conversation_id)
    assert "acme/carol" == conversation.owner


@pytest.mark.parametrize("credential", ["", "tw_" + "x" * 43, "eyJhbGciOi.bad.token"])
async def test_complete_and_converse_refuse_bad_credentials(
    key_store: SQLiteKeyStore, credential: str
) -> None:
    """Without valid credentials Complete, Converse and ListModels are UNAUTHENTICATED."""
    fake = FakeBackend()
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    metadata = bearer(credential) if credential else None
    async with running_server(fake, interceptors=[ErrorsInterceptor(), auth]) as running:
        complete = running.chat.Complete(chat_pb2.CompleteRequest(message="Hi"), metadata=metadata)
        converse = running.chat.Converse(metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as models:
            await running.models.ListModels(models_pb2.ListModelsRequest(), metadata=metadata)
        codes = [await complete.code(), await converse.code(), models.value.code()]
    assert [grpc.StatusCode.UNAUTHENTICATED] * 3 == codes
    assert [] == fake.requests


async def test_the_chat_server_s_health_check_is_open(key_store: SQLiteKeyStore) -> None:
    """Load balancers can health-check a server that requires credentials."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    async with running_server(FakeBackend(), interceptors=[ErrorsInterceptor(), auth]) as running:
        health = health_pb2_grpc.HealthStub(running.channel)
        response = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert health_pb2.HealthCheckResponse.SERVING == response.status
