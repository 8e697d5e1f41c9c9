"""AdminService on a real server: admins create, list and revoke keys; secrets appear once."""

from __future__ import annotations

import grpc
import pytest

from tests.auth.conftest import auth_config, bearer, running_auth_server
from tokenwire.auth import IssuedKey, SQLiteKeyStore
from tokenwire.auth.interceptor import AuthInterceptor
from tokenwire.proto.v1 import admin_pb2
from tokenwire.testing.echo import echo_pb2


async def test_an_admin_creates_lists_and_revokes_a_key(
    key_store: SQLiteKeyStore, admin_key: IssuedKey
) -> None:
    """A created key works at once, is listed without its secret, and stops once revoked."""
    auth = AuthInterceptor(auth_config(key_cache_ttl_s=60.0), "", key_store=key_store)
    as_admin = bearer(admin_key.secret)
    async with running_auth_server(auth) as server:
        created = await server.admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(
                tenant="acme", user="dave", roles=["writer", "reader"], plan="pro",
                description="CI",
            ),
            metadata=as_admin,
        )  # fmt: skip
        secret = created.secret
        echoed = await server.stub.Unary(echo_pb2.EchoRequest(text="hi"), metadata=bearer(secret))
        listed = await server.admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=as_admin)
        revoked = await server.admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(id=created.key.id), metadata=as_admin
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            # Revoked through this process's AdminService: no wait for the 60 s cache.
            await server.stub.Unary(echo_pb2.EchoRequest(text="hi"), metadata=bearer(secret))
        active = await server.admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=as_admin)
        everything = await server.admin.ListApiKeys(
            admin_pb2.ListApiKeysRequest(include_revoked=True), metadata=as_admin
        )
    assert "hi" == echoed.text
    key = created.key
    assert (key.tenant, key.user, list(key.roles), key.plan, key.description) == (
        "acme", "dave", ["reader", "writer"], "pro", "CI",
    )  # fmt: skip
    assert admin_pb2.API_KEY_STATE_ACTIVE == key.state
    assert secret.startswith(key.prefix)
    assert [key.id, admin_key.key.id] == [k.id for k in listed.keys]
    assert secret.encode() not in listed.SerializeToString()
    assert admin_pb2.API_KEY_STATE_REVOKED == revoked.key.state
    assert revoked.key.HasField("revoked_at")
    assert grpc.StatusCode.UNAUTHENTICATED == refused.value.code()
    assert [admin_key.key.id] == [k.id for k in active.keys]
    assert 2 == len(everything.keys)


async def test_listing_is_paginated(key_store: SQLiteKeyStore, admin_key: IssuedKey) -> None:
    """page_size bounds a page; next_page_token walks the rest, newest first."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    as_admin = bearer(admin_key.secret)
    async with running_auth_server(auth) as server:
        for user in ("u1", "u2", "u3"):
            await server.admin.CreateApiKey(
                admin_pb2.CreateApiKeyRequest(tenant="t", user=user), metadata=as_admin
            )
        users, token = [], ""
        while True:
            page = await server.admin.ListApiKeys(
                admin_pb2.ListApiKeysRequest(page_size=2, page_token=token, tenant="t"),
                metadata=as_admin,
            )
            users.append([k.user for k in page.keys])
            token = page.next_page_token
            if not token:
                break
    assert [["u3", "u2"], ["u1"]] == users


@pytest.mark.parametrize(
    ("method", "request_", "code"),
    [
        ("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(id="key_0123456789abcdef"), "NOT_FOUND"),
        ("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(id=""), "NOT_FOUND"),
        ("CreateApiKey", admin_pb2.CreateApiKeyRequest(tenant="", user="x"), "INVALID_ARGUMENT"),
        ("CreateApiKey", admin_pb2.CreateApiKeyRequest(tenant="a/b", user="x"), "INVALID_ARGUMENT"),
        ("CreateApiKey", admin_pb2.CreateApiKeyRequest(tenant="a", user=""), "INVALID_ARGUMENT"),
        ("ListApiKeys", admin_pb2.ListApiKeysRequest(page_token="bogus"), "INVALID_ARGUMENT"),
        ("ListApiKeys", admin_pb2.ListApiKeysRequest(page_size=-1), "INVALID_ARGUMENT"),
    ],
)
async def test_admin_errors_map_to_statuses(
    method: str, request_: object, code: str, key_store: SQLiteKeyStore, admin_key: IssuedKey
) -> None:
    """Unknown keys are NOT_FOUND; malformed requests are INVALID_ARGUMENT."""
    auth = AuthInterceptor(auth_config(), "", key_store=key_store)
    async with running_auth_server(auth) as server:
        call = getattr(server.admin, method)(request_, metadata=bearer(admin_key.secret))
        assert getattr(grpc.StatusCode, code) == await call.code()
