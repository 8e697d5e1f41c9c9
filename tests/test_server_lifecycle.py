"""Server lifecycle and generic tooling: drain, health, reflection, request ids, models."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.conftest import wait_until
from tests.test_chat_service import next_event, start, text_of
from tokenwire.interceptors import REQUEST_ID_HEADER
from tokenwire.proto.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, models_pb2
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server


async def test_graceful_drain_finishes_an_in_flight_stream() -> None:
    """On stop, health goes NOT_SERVING, the running stream completes, then the backend closes."""
    reply = "abcdefghijklmnopqrst"
    fake = FakeBackend(reply=reply, token_delay_s=0.02)
    config = config_for_tests()
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, drain_delay_s=0.2)
    )
    async with running_server(fake, config) as running:
        health = health_pb2_grpc.HealthStub(running.channel)
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="go"))
        events = [await anext(aiter(call))]
        stopping = asyncio.create_task(running.server.stop(grace=10))
        await wait_until(lambda: running.server._chat is not None and running.server._chat.draining)
        status = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        events += [event async for event in call]
        await stopping
    assert reply == text_of(events)
    assert events[-1].finished.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert fake.closed


async def test_drain_lets_a_converse_turn_finish_then_ends_the_stream() -> None:
    """A Converse session being drained finishes its turn, then ends with OK."""
    fake = FakeBackend(reply="abcdefghij", token_delay_s=0.02)
    async with running_server(fake) as running:
        call = running.chat.Converse()
        await call.write(start("go"))
        await next_event(call, "delta")
        stopping = asyncio.create_task(running.server.stop(grace=10))
        finished = (await next_event(call, "finished")).finished
        assert finished.finish_reason == chat_pb2.FINISH_REASON_STOP
        assert await call.code() == grpc.StatusCode.OK
        await stopping


async def test_stop_cuts_streams_that_outlive_the_grace_period() -> None:
    """A stream still running when the grace period ends is cut and the engine stops."""
    fake = FakeBackend(reply="abc", endless=True, token_delay_s=0.01)
    async with running_server(fake) as running:
        call = running.chat.Complete(chat_pb2.CompleteRequest(message="go"))
        await anext(aiter(call))
        await running.server.stop(grace=0.2)
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in call:
                pass
        await wait_until(lambda: fake.running == 0)
    assert fake.closed


async def test_health_reports_serving(served: RunningServer) -> None:
    """The standard health service reports SERVING for the server and the chat service."""
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "tokenwire.v1.ChatService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_request_id_is_echoed_or_assigned(served: RunningServer) -> None:
    """The client's x-request-id comes back in the initial metadata; without one, one is made."""
    call = served.chat.Complete(
        chat_pb2.CompleteRequest(message="Hi"), metadata=((REQUEST_ID_HEADER, "req-42"),)
    )
    assert dict(await call.initial_metadata())[REQUEST_ID_HEADER] == "req-42"
    _ = [event async for event in call]
    call = served.chat.Complete(chat_pb2.CompleteRequest(message="Hi"))
    assert len(dict(await call.initial_metadata())[REQUEST_ID_HEADER]) == 32
    _ = [event async for event in call]


async def test_list_models_names_the_served_model(served: RunningServer) -> None:
    """ListModels names the backend's model as the default, with its context length."""
    response = await served.models.ListModels(models_pb2.ListModelsRequest())
    assert [(m.name, m.context_length, m.is_default) for m in response.models] == [
        ("fake", 4096, True)
    ]


def _reflection_only_client(address: str) -> tuple[list[str], int, str]:
    """Discover services and messages through reflection alone, then check health and chat."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        health = pool.FindServiceByName("grpc.health.v1.Health").FindMethodByName("Check")
        check_request = message_factory.GetMessageClass(health.input_type)()
        check_response = message_factory.GetMessageClass(health.output_type)
        status = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=check_response.FromString,
        )(check_request).status
        method = pool.FindServiceByName("tokenwire.v1.ChatService").FindMethodByName("Complete")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls(message="Hello there")
        stream = channel.unary_stream(
            "/tokenwire.v1.ChatService/Complete",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )(request)
        text = "".join(r.delta.text for r in stream if r.WhichOneof("event") == "delta")
    return services, status, text


async def test_a_reflection_only_client_can_list_check_and_chat(served: RunningServer) -> None:
    """Knowing only reflection data, a client lists ChatService, checks health and streams."""
    services, status, text = await asyncio.to_thread(_reflection_only_client, served.address)
    assert "tokenwire.v1.ChatService" in services
    assert "grpc.health.v1.Health" in services
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert text == "Hello, world!"


async def test_the_default_chain_moderates_chat_input(served: RunningServer) -> None:
    """A server built from config alone refuses flagged input with the content_filter error."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        _ = [
            e
            async for e in served.chat.Complete(chat_pb2.CompleteRequest(message="I will kill you"))
        ]
    assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()
    assert "content_filter" == dict(raised.value.trailing_metadata() or ())["x-error-type"]


async def test_the_default_server_is_secure_and_its_first_admin_key_works(tmp_path: Path) -> None:
    """With auth on (the default), calls need a key; the first start writes an admin key."""
    config = config_for_tests()
    config = dataclasses.replace(
        config,
        auth=dataclasses.replace(config.auth, enabled=True, key_cache_ttl_s=0),
        store=dataclasses.replace(config.store, data_dir=str(tmp_path)),
    )
    async with running_server(FakeBackend(), config) as running:
        request = chat_pb2.CompleteRequest(message="Hi")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            _ = [e async for e in running.chat.Complete(request)]
        assert grpc.StatusCode.UNAUTHENTICATED == raised.value.code()
        key = (tmp_path / "admin.key").read_text().strip()
        assert key.startswith("tw_")
        assert 0o600 == (tmp_path / "admin.key").stat().st_mode & 0o777
        auth = (("authorization", f"Bearer {key}"),)
        events = [e async for e in running.chat.Complete(request, metadata=auth)]
        assert "Hello from the fake backend." == text_of(events)
        admin = admin_pb2_grpc.AdminServiceStub(running.channel)
        listed = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=auth)
        assert 1 == len(listed.keys)
