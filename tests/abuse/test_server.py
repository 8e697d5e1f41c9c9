"""Abuse signals through a real server with API keys: throttled, suspended, listed, lifted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.abuse.conftest import (
    FLAGGED,
    AbuseServer,
    Keys,
    Outcome,
    abuse_config,
    abuse_server,
    complete,
    outcome,
)
from tests.auth.conftest import bearer
from tokenwire.abuse import AbuseConfig
from tokenwire.abuse.refusals import THROTTLE_QUOTA
from tokenwire.proto.v1 import admin_pb2, chat_pb2, conversations_pb2, models_pb2

OK = grpc.StatusCode.OK
FILTERED = grpc.StatusCode.INVALID_ARGUMENT  # the rules moderator refused the message
SUSPENDED = "suspended for repeated policy violations: 6 flagged messages within 3600s"
# Throttled at 3 flags to 2 turns per 0.6 s (a turn every 0.3 s); suspended at 6.
FAST = abuse_config(throttle_after=3, suspend_after=6, throttle_window_s=0.6)


@pytest.fixture
async def server(keys: Keys) -> AsyncIterator[AbuseServer]:
    """The server with FAST's thresholds, in memory."""
    async with abuse_server(keys, FAST) as running:
        yield running


def standing_request(tenant: str = "acme", user: str = "alice") -> Any:
    """GetAccountStanding of ``tenant/user``."""
    return admin_pb2.GetAccountStandingRequest(tenant=tenant, user=user)


async def every_rpc(server: AbuseServer, keys: Keys) -> list[grpc.StatusCode]:
    """The status of one call of each service as alice."""
    as_alice = bearer(keys.alice.secret)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: server.running.models.ListModels(models_pb2.ListModelsRequest(), metadata=as_alice),
        lambda: server.running.conversations.ListConversations(
            conversations_pb2.ListConversationsRequest(), metadata=as_alice
        ),
        lambda: server.admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=as_alice),
    ]
    codes = [(await outcome(call)).code for call in calls]
    return [*codes, (await complete(server.running.chat, keys.alice, "Hello")).code]


async def test_a_principal_is_throttled_then_suspended_then_lifted(
    server: AbuseServer, keys: Keys
) -> None:
    """Three flags throttle alice: two more turns pass, the next is RESOURCE_EXHAUSTED with
    RetryInfo; after the delay a sixth flag suspends her: every call is PERMISSION_DENIED
    with the reason, bob is served throughout, and LiftSuspension restores service."""
    chat, as_admin = server.running.chat, bearer(keys.admin.secret)
    flagged = [(await complete(chat, keys.alice, FLAGGED)).code for _ in range(5)]
    throttled = await complete(chat, keys.alice, "Hello")
    bob = (await complete(chat, keys.bob, "Hello")).code
    assert throttled.retry_after_s is not None
    await asyncio.sleep(throttled.retry_after_s)
    sixth = (await complete(chat, keys.alice, FLAGGED)).code
    refused = await complete(chat, keys.alice, "Hello")
    refusals = await every_rpc(server, keys)
    standing = await server.admin.GetAccountStanding(standing_request(), metadata=as_admin)
    lifted = await server.admin.LiftSuspension(
        admin_pb2.LiftSuspensionRequest(tenant="acme", user="alice"), metadata=as_admin
    )
    served = await every_rpc(server, keys)
    assert [FILTERED] * 5 == flagged
    assert grpc.StatusCode.RESOURCE_EXHAUSTED == throttled.code
    assert 0.0 < throttled.retry_after_s <= 0.3
    assert (THROTTLE_QUOTA,) == throttled.quota_ids
    assert (OK, FILTERED) == (bob, sixth)
    assert grpc.StatusCode.PERMISSION_DENIED == refused.code
    assert refused.message.startswith(SUSPENDED)
    assert refused.message.endswith("contact your administrator")
    assert [grpc.StatusCode.PERMISSION_DENIED] * 4 == refusals
    state = standing.standing
    assert (6, True, True) == (state.flags_in_window, state.throttled, state.suspended)
    assert state.reason.startswith("6 flagged messages within 3600s (latest: violence)")
    assert state.HasField("suspended_at")
    assert not state.HasField("suspended_until")
    assert lifted.previous.suspended
    # ListApiKeys needs the admin role: PERMISSION_DENIED for alice, now for that reason.
    assert [OK, OK, grpc.StatusCode.PERMISSION_DENIED, OK] == served


async def test_health_checks_pass_for_a_suspended_principal(keys: Keys) -> None:
    """Calls that need no credentials have no principal to refuse."""
    async with abuse_server(keys, abuse_config(throttle_after=0, suspend_after=2)) as server:
        for _ in range(2):
            await complete(server.running.chat, keys.alice, FLAGGED)
        health = health_pb2_grpc.HealthStub(server.running.channel)
        answer = await health.Check(
            health_pb2.HealthCheckRequest(), metadata=bearer(keys.alice.secret)
        )
        refused = await complete(server.running.chat, keys.alice, "Hello")
    assert health_pb2.HealthCheckResponse.SERVING == answer.status
    assert grpc.StatusCode.PERMISSION_DENIED == refused.code


async def test_a_converse_stream_open_before_the_suspension_stops_at_its_next_turn(
    keys: Keys,
) -> None:
    """The stream's turns are counted; the turn after the suspension gets a TurnError with
    PERMISSION_DENIED, though the stream was admitted before."""
    config = abuse_config(throttle_after=0, suspend_after=2)
    async with abuse_server(keys, config) as server:
        requests: asyncio.Queue[chat_pb2.ConverseRequest | None] = asyncio.Queue()

        async def feed() -> AsyncIterator[chat_pb2.ConverseRequest]:
            while (request := await requests.get()) is not None:
                yield request

        stream = server.running.chat.Converse(feed(), metadata=bearer(keys.alice.secret))
        errors = []
        for message in (FLAGGED, FLAGGED, "Hello"):
            await requests.put(chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message=message)))
            response = await stream.read()
            assert response.HasField("error")
            errors.append((response.error.code, response.error.error_type))
        await requests.put(None)
    denied = grpc.StatusCode.PERMISSION_DENIED.value[0]
    filtered = (FILTERED.value[0], "content_filter")
    assert [filtered, filtered, (denied, "account_suspended")] == errors


async def test_flagged_answers_count_too(keys: Keys) -> None:
    """An answer cut by output moderation is a flag of its principal."""
    async with abuse_server(keys, abuse_config(), reply=FLAGGED) as server:
        await complete(server.running.chat, keys.alice, "Say it")
        await asyncio.sleep(0.05)
        standing = await server.admin.GetAccountStanding(
            standing_request(), metadata=bearer(keys.admin.secret)
        )
        events = await server.admin.ListFlaggedEvents(
            admin_pb2.ListFlaggedEventsRequest(), metadata=bearer(keys.admin.secret)
        )
    assert 1 == standing.standing.flags_in_window
    assert [("output", "violence", "block")] == [
        (e.direction, e.category, e.action) for e in events.events
    ]


async def test_flagged_events_are_listed_without_text_unless_the_tenant_keeps_it(
    server: AbuseServer, keys: Keys
) -> None:
    """Events list newest first with who, turn, category and action; the text only for a
    tenant whose policy keeps it; the filters and pages narrow them."""
    as_admin = bearer(keys.admin.secret)
    keep = admin_pb2.TenantModerationPolicy(tenant="globex", keep_text=True)
    await server.admin.SetModerationPolicy(
        admin_pb2.SetModerationPolicyRequest(policy=keep), metadata=as_admin
    )
    await complete(server.running.chat, keys.alice, FLAGGED)
    await complete(server.running.chat, keys.bob, FLAGGED)
    await complete(server.running.chat, keys.carol, FLAGGED)
    listed = await server.admin.ListFlaggedEvents(
        admin_pb2.ListFlaggedEventsRequest(), metadata=as_admin
    )
    acme = await server.admin.ListFlaggedEvents(
        admin_pb2.ListFlaggedEventsRequest(tenant="acme", page_size=1), metadata=as_admin
    )
    rest = await server.admin.ListFlaggedEvents(
        admin_pb2.ListFlaggedEventsRequest(tenant="acme", page_token=acme.next_page_token),
        metadata=as_admin,
    )
    alice = await server.admin.ListFlaggedEvents(
        admin_pb2.ListFlaggedEventsRequest(tenant="acme", user="alice"), metadata=as_admin
    )
    rows = [(e.tenant, e.user, e.direction, e.category, e.action, e.text) for e in listed.events]
    assert [
        ("globex", "carol", "input", "violence", "block", FLAGGED),
        ("acme", "bob", "input", "violence", "block", ""),
        ("acme", "alice", "input", "violence", "block", ""),
    ] == rows
    assert all(e.id.startswith("flag_") and e.turn_id.startswith("turn_") for e in listed.events)
    assert ["bob", "alice"] == [e.user for e in [*acme.events, *rest.events]]
    assert "" == rest.next_page_token
    assert ["alice"] == [e.user for e in alice.events]


async def test_a_category_the_tenants_policy_allows_is_not_counted(
    server: AbuseServer, keys: Keys
) -> None:
    """With violence allowed for acme, alice's violent messages are answered, listed as
    allow, and never throttle or suspend her; globex still blocks them."""
    as_admin = bearer(keys.admin.secret)
    policy = admin_pb2.TenantModerationPolicy(tenant="acme", category_actions={"violence": "allow"})
    set_policy = await server.admin.SetModerationPolicy(
        admin_pb2.SetModerationPolicyRequest(policy=policy), metadata=as_admin
    )
    got = await server.admin.GetModerationPolicy(
        admin_pb2.GetModerationPolicyRequest(tenant="acme"), metadata=as_admin
    )
    codes = [(await complete(server.running.chat, keys.alice, FLAGGED)).code for _ in range(7)]
    carol = (await complete(server.running.chat, keys.carol, FLAGGED)).code
    standing = await server.admin.GetAccountStanding(standing_request(), metadata=as_admin)
    events = await server.admin.ListFlaggedEvents(
        admin_pb2.ListFlaggedEventsRequest(tenant="acme"), metadata=as_admin
    )
    assert {"violence": "allow"} == dict(set_policy.policy.category_actions)
    assert ({"violence": "allow"}, False) == (
        dict(got.policy.category_actions),
        got.policy.HasField("keep_text"),
    )
    assert [OK] * 7 == codes
    assert FILTERED == carol
    assert (0, False, False) == (
        standing.standing.flags_in_window,
        standing.standing.throttled,
        standing.standing.suspended,
    )
    assert ["allow"] * 7 == [e.action for e in events.events]


async def test_a_policy_with_an_unknown_action_is_invalid_argument(
    server: AbuseServer, keys: Keys
) -> None:
    """SetModerationPolicy refuses an action other than block, log or allow, and a policy
    without a tenant, and keeps the policy it had."""
    as_admin = bearer(keys.admin.secret)
    bad = admin_pb2.TenantModerationPolicy(tenant="acme", category_actions={"violence": "warn"})
    refused = await outcome(
        lambda: server.admin.SetModerationPolicy(
            admin_pb2.SetModerationPolicyRequest(policy=bad), metadata=as_admin
        )
    )
    nameless = await outcome(
        lambda: server.admin.SetModerationPolicy(
            admin_pb2.SetModerationPolicyRequest(), metadata=as_admin
        )
    )
    kept = await server.admin.GetModerationPolicy(
        admin_pb2.GetModerationPolicyRequest(tenant="acme"), metadata=as_admin
    )
    assert grpc.StatusCode.INVALID_ARGUMENT == refused.code
    assert "block, log, allow" in refused.message
    assert grpc.StatusCode.INVALID_ARGUMENT == nameless.code
    assert {} == dict(kept.policy.category_actions)


async def test_the_abuse_rpcs_need_the_admin_role(server: AbuseServer, keys: Keys) -> None:
    """Every abuse RPC is PERMISSION_DENIED for a caller without the admin role."""
    admin, as_alice = server.admin, bearer(keys.alice.secret)
    policy = admin_pb2.TenantModerationPolicy(tenant="acme", category_actions={"hate": "allow"})
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: admin.ListFlaggedEvents(admin_pb2.ListFlaggedEventsRequest(), metadata=as_alice),
        lambda: admin.GetAccountStanding(standing_request(), metadata=as_alice),
        lambda: admin.LiftSuspension(
            admin_pb2.LiftSuspensionRequest(tenant="acme", user="alice"), metadata=as_alice
        ),
        lambda: admin.GetModerationPolicy(
            admin_pb2.GetModerationPolicyRequest(tenant="acme"), metadata=as_alice
        ),
        lambda: admin.SetModerationPolicy(
            admin_pb2.SetModerationPolicyRequest(policy=policy), metadata=as_alice
        ),
    ]
    outcomes: list[Outcome] = [await outcome(call) for call in calls]
    assert [grpc.StatusCode.PERMISSION_DENIED] * 5 == [o.code for o in outcomes]


async def test_the_abuse_rpcs_are_failed_precondition_with_abuse_off(keys: Keys) -> None:
    """abuse.enabled = false: nothing is counted and the abuse RPCs say why they cannot answer."""
    async with abuse_server(keys, AbuseConfig(enabled=False)) as server:
        codes = [(await complete(server.running.chat, keys.alice, FLAGGED)).code for _ in range(12)]
        standing = await outcome(
            lambda: server.admin.GetAccountStanding(
                standing_request(), metadata=bearer(keys.admin.secret)
            )
        )
    assert [FILTERED] * 12 == codes
    assert grpc.StatusCode.FAILED_PRECONDITION == standing.code
    assert "abuse.enabled" in standing.message


async def test_account_rpcs_need_a_tenant_and_a_user(server: AbuseServer, keys: Keys) -> None:
    """GetAccountStanding and LiftSuspension without a user are INVALID_ARGUMENT."""
    refused = await outcome(
        lambda: server.admin.GetAccountStanding(
            standing_request(user=""), metadata=bearer(keys.admin.secret)
        )
    )
    assert grpc.StatusCode.INVALID_ARGUMENT == refused.code
