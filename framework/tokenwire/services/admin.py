"""``tokenwire.v1.AdminService``: API keys, usage and abuse signals over gRPC (the auth
interceptor admits admins only).

    add_admin_service(server, auth.key_store, usage=UsageReport(store, config.usage),
                      abuse=pipeline.abuse)

Every change is logged with who made it (``tokenwire.audit``), never with a secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2

from tokenwire.abuse.store import Standing, TenantPolicy
from tokenwire.auth.keys import ApiKey, KeyStore, make_principal
from tokenwire.context import current_principal
from tokenwire.errors import FailedPreconditionError, InvalidArgumentError
from tokenwire.logs import get_logger
from tokenwire.proto.v1 import admin_pb2, admin_pb2_grpc
from tokenwire.stores.moderation_events import ModerationEventQuery, ModerationEventRecord

if TYPE_CHECKING:
    from tokenwire.abuse.monitor import AbuseMonitor
    from tokenwire.usage.report import UsageReport

__all__ = [
    "ADMIN_SERVICE_NAME",
    "AdminServicer",
    "add_admin_service",
    "api_key_message",
    "flagged_event_message",
    "standing_message",
]

ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
_audit = get_logger("tokenwire.audit")
Context = grpc.aio.ServicerContext[Any, Any]
_GROUPS = {
    admin_pb2.USAGE_GROUP_BY_TENANT: "tenant",
    admin_pb2.USAGE_GROUP_BY_USER: "user",
    admin_pb2.USAGE_GROUP_BY_MODEL: "model",
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = int(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def api_key_message(key: ApiKey) -> admin_pb2.ApiKey:
    """The listed form of a key (never its secret)."""
    message = admin_pb2.ApiKey(
        id=key.id,
        prefix=key.prefix,
        tenant=key.principal.tenant,
        user=key.principal.user,
        roles=sorted(key.principal.roles),
        plan=key.principal.plan,
        description=key.description,
        created_at=_timestamp(key.created_at),
        state=admin_pb2.API_KEY_STATE_ACTIVE if key.active else admin_pb2.API_KEY_STATE_REVOKED,
    )
    if key.revoked_at is not None:
        message.revoked_at.CopyFrom(_timestamp(key.revoked_at))
    return message


def _seconds(request: admin_pb2.GetUsageRequest, name: str) -> float:
    if not request.HasField(name):  # type: ignore[arg-type]
        raise InvalidArgumentError(f"{name} is required")
    stamp: timestamp_pb2.Timestamp = getattr(request, name)
    return stamp.seconds + stamp.nanos / 1e9


def _optional_seconds(request: admin_pb2.ListFlaggedEventsRequest, name: str) -> float | None:
    if not request.HasField(name):  # type: ignore[arg-type]
        return None
    stamp: timestamp_pb2.Timestamp = getattr(request, name)
    return stamp.seconds + stamp.nanos / 1e9


def _account(tenant: str, user: str) -> tuple[str, str]:
    if not tenant or not user:
        raise InvalidArgumentError("tenant and user are required")
    return tenant, user


def flagged_event_message(event: ModerationEventRecord) -> admin_pb2.FlaggedEvent:
    """The listed form of a flagged moderation event."""
    return admin_pb2.FlaggedEvent(
        id=event.event_id,
        time=_timestamp(event.recorded_at),
        tenant=event.tenant,
        user=event.user,
        turn_id=event.turn_id,
        direction=event.direction,
        category=event.category,
        moderator=event.moderator,
        score=event.score,
        action=event.action,
        text=event.text,
    )


def standing_message(tenant: str, user: str, standing: Standing) -> admin_pb2.AccountStanding:
    """An account's standing as AdminService sends it."""
    message = admin_pb2.AccountStanding(
        tenant=tenant,
        user=user,
        flags_in_window=standing.flags,
        throttled=standing.throttled,
        suspended=standing.suspended,
        reason=standing.reason,
    )
    if standing.suspended:
        message.suspended_at.CopyFrom(_timestamp(standing.suspended_at))
        if standing.until:
            message.suspended_until.CopyFrom(_timestamp(standing.until))
    return message


def _policy_message(tenant: str, policy: TenantPolicy) -> admin_pb2.TenantModerationPolicy:
    message = admin_pb2.TenantModerationPolicy(tenant=tenant, category_actions=dict(policy.actions))
    if policy.keep_text is not None:
        message.keep_text = policy.keep_text
    return message


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Creates, lists and revokes API keys in ``key_store``; reports ``usage``
    (None: GetUsage is FAILED_PRECONDITION, usage is not recorded); lists flagged
    events, reads and lifts standings and sets tenant policies through ``abuse``
    (None: those are FAILED_PRECONDITION, abuse signals are off)."""

    def __init__(
        self,
        key_store: KeyStore,
        usage: UsageReport | None = None,
        abuse: AbuseMonitor | None = None,
    ) -> None:
        self.key_store = key_store
        self.usage = usage
        self.abuse = abuse

    def _monitor(self) -> AbuseMonitor:
        if self.abuse is None:
            raise FailedPreconditionError("this server has abuse signals off (abuse.enabled)")
        return self.abuse

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: Context
    ) -> admin_pb2.CreateApiKeyResponse:
        principal = make_principal(request.tenant, request.user, request.roles, request.plan)
        issued = await self.key_store.create_key(principal, description=request.description)
        _audit.info(
            "api key created",
            key_id=issued.key.id,
            key_tenant=principal.tenant,
            key_user=principal.user,
            key_roles=sorted(principal.roles),
            by=current_principal().owner,
        )
        return admin_pb2.CreateApiKeyResponse(key=api_key_message(issued.key), secret=issued.secret)

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: Context
    ) -> admin_pb2.ListApiKeysResponse:
        page = await self.key_store.list_keys(
            tenant=request.tenant,
            include_revoked=request.include_revoked,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return admin_pb2.ListApiKeysResponse(
            keys=[api_key_message(key) for key in page.keys],
            next_page_token=page.next_page_token,
        )

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: Context
    ) -> admin_pb2.RevokeApiKeyResponse:
        key = await self.key_store.revoke_key(request.id)
        _audit.info("api key revoked", key_id=key.id, by=current_principal().owner)
        return admin_pb2.RevokeApiKeyResponse(key=api_key_message(key))

    async def GetUsage(
        self, request: admin_pb2.GetUsageRequest, context: Context
    ) -> admin_pb2.GetUsageResponse:
        start, end = _seconds(request, "start_time"), _seconds(request, "end_time")
        group_by = _GROUPS.get(request.group_by)
        if group_by is None:
            raise InvalidArgumentError("group_by is required: TENANT, USER or MODEL")
        if self.usage is None:
            raise FailedPreconditionError("this server does not record usage (usage.enabled)")
        rows = await self.usage.usage(
            start=start, end=end, group_by=group_by, tenant=request.tenant
        )
        return admin_pb2.GetUsageResponse(
            rows=[
                admin_pb2.UsageRow(
                    key=row.key,
                    turns=row.turns,
                    prompt_tokens=row.prompt_tokens,
                    completion_tokens=row.completion_tokens,
                    cost=row.cost_float,
                    cost_micros=row.cost_micros,
                )
                for row in rows
            ],
            currency=self.usage.currency,
        )

    async def ListFlaggedEvents(
        self, request: admin_pb2.ListFlaggedEventsRequest, context: Context
    ) -> admin_pb2.ListFlaggedEventsResponse:
        monitor = self._monitor()
        page_size = request.page_size or 50
        page = await monitor.list_events(
            ModerationEventQuery(
                tenant=request.tenant,
                user=request.user,
                since=_optional_seconds(request, "since"),
                until=_optional_seconds(request, "until"),
                page_size=min(max(page_size, 1), 500),
                cursor=request.page_token,
            )
        )
        return admin_pb2.ListFlaggedEventsResponse(
            events=[flagged_event_message(event) for event in page.items],
            next_page_token=page.next_cursor,
        )

    async def GetAccountStanding(
        self, request: admin_pb2.GetAccountStandingRequest, context: Context
    ) -> admin_pb2.GetAccountStandingResponse:
        monitor = self._monitor()
        tenant, user = _account(request.tenant, request.user)
        standing = await monitor.account_standing(tenant, user)
        return admin_pb2.GetAccountStandingResponse(
            standing=standing_message(tenant, user, standing)
        )

    async def LiftSuspension(
        self, request: admin_pb2.LiftSuspensionRequest, context: Context
    ) -> admin_pb2.LiftSuspensionResponse:
        monitor = self._monitor()
        tenant, user = _account(request.tenant, request.user)
        before = await monitor.lift(tenant, user, by=current_principal().owner)
        return admin_pb2.LiftSuspensionResponse(previous=standing_message(tenant, user, before))

    async def GetModerationPolicy(
        self, request: admin_pb2.GetModerationPolicyRequest, context: Context
    ) -> admin_pb2.GetModerationPolicyResponse:
        monitor = self._monitor()
        if not request.tenant:
            raise InvalidArgumentError("tenant is required")
        policy = await monitor.policy(request.tenant)
        return admin_pb2.GetModerationPolicyResponse(policy=_policy_message(request.tenant, policy))

    async def SetModerationPolicy(
        self, request: admin_pb2.SetModerationPolicyRequest, context: Context
    ) -> admin_pb2.SetModerationPolicyResponse:
        monitor = self._monitor()
        given = request.policy
        keep = given.keep_text if given.HasField("keep_text") else None
        policy = await monitor.set_policy(
            given.tenant,
            TenantPolicy(dict(given.category_actions), keep),
            by=current_principal().owner,
        )
        return admin_pb2.SetModerationPolicyResponse(policy=_policy_message(given.tenant, policy))


def add_admin_service(
    server: grpc.aio.Server,
    key_store: KeyStore,
    *,
    usage: UsageReport | None = None,
    abuse: AbuseMonitor | None = None,
) -> AdminServicer:
    """Serve the AdminService on ``server``; add ``ADMIN_SERVICE_NAME`` to reflection.

    ``usage`` answers GetUsage; without it GetUsage is FAILED_PRECONDITION. ``abuse``
    answers the flagged events, standings and tenant policies; without it they are
    FAILED_PRECONDITION.
    """
    servicer = AdminServicer(key_store, usage, abuse)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server)
    return servicer
