"""Quotas on every call: requests, tokens and concurrent streams, per principal and per tenant.

Runs after authentication (it reads ``current_call().principal``). For each call:

* **concurrent streams**: a streaming call (any shape but unary-unary) takes a
  slot before its handler runs and gives it back when the call ends however it
  ends (normal end, error, client cancel or disconnect, deadline, or a refusal
  before the stream was ever read);
* **requests**: every call counts one, except a ``Converse`` stream, whose every
  ``StartTurn`` counts one instead (the stream itself is free);
* **tokens**: each chat turn reserves ``prompt_tokens + max_tokens`` before it
  runs and settles to ``prompt_tokens + completion_tokens`` when it ends
  (finished, cancelled, failed or cut by a filter): that, and counting each
  ``Converse`` turn, is the turn-level half, :class:`~tokenwire.quotas.policy.QuotaPolicy`,
  which shares this interceptor's store and limits.

A request is counted once it passes the request limit, even if its token
reservation is then refused. Refusals raise ``ResourceExhaustedError`` with a
true retry delay (google.rpc RetryInfo) and a google.rpc ``QuotaFailure`` naming
each violated quota (subject ``principal:TENANT/USER`` or ``tenant:TENANT``,
description ``requests_per_minute``, ``tokens_per_minute`` or
``concurrent_streams``). A turn that could never fit (its reservation exceeds
the whole limit) is refused without a retry delay. Health checks and reflection
are never counted.

    quotas = QuotaInterceptor(config.quotas)
    interceptors = [ErrorsInterceptor(), auth, quotas]    # and QuotaPolicy(quotas) per turn

Per call this costs a dictionary lookup when the caller's plan is unlimited,
and otherwise one store operation per counted dimension (in memory about 3 µs
for a unary call; with Redis one round trip each); per streamed message, one
generator step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2

from tokenwire.auth.principal import Principal
from tokenwire.context import current_principal
from tokenwire.errors import ConfigError, ResourceExhaustedError, UnavailableError
from tokenwire.interceptors.base import CallInfo, Interceptor, Proceed
from tokenwire.logs import get_logger
from tokenwire.proto.v1 import chat_pb2
from tokenwire.quotas.config import PlanLimits, QuotaConfig
from tokenwire.quotas.store import (
    Admission,
    Lease,
    QuotaStore,
    QuotaStoreError,
    Rate,
    Reservation,
    Slot,
    Verdict,
    tenant_tag,
)
from tokenwire.streams import closing

__all__ = [
    "CALL_TURN_METHODS",
    "COMPLETE_METHOD",
    "CONVERSE_METHOD",
    "EXEMPT_SERVICES",
    "INFER_METHOD",
    "INFER_STREAM_METHOD",
    "SLOT_PER_TURN_METHODS",
    "TURN_STREAM_METHODS",
    "QuotaInterceptor",
    "QuotaLimits",
]

_log = get_logger("tokenwire.quotas")

EXEMPT_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)
CONVERSE_METHOD = "/{}/Converse".format(
    chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
)
# One call, one turn: with a QuotaPolicy attached, the turn takes its stream slot, its
# request and its tokens in one store call (QuotaPolicy.before_turn), not three.
COMPLETE_METHOD = "/{}/Complete".format(
    chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
)
# The Open Inference Protocol's calls, named without importing their stubs
# (tritonclient is an optional extra).
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
INFER_STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
CALL_TURN_METHODS = frozenset({COMPLETE_METHOD, INFER_METHOD})
# Streams of many turns: each turn counts as a request (QuotaPolicy), the stream itself
# does not.
TURN_STREAM_METHODS = frozenset({CONVERSE_METHOD, INFER_STREAM_METHOD})
# Streams whose turns run side by side: each turn takes a stream slot of its own (a
# Converse session, one turn at a time, holds one slot for the call).
SLOT_PER_TURN_METHODS = frozenset({INFER_STREAM_METHOD})
_REQUESTS, _TOKENS, _STREAMS = "requests_per_minute", "tokens_per_minute", "concurrent_streams"
_CACHE_LIMIT = 10_000  # principals whose keys are kept precomputed
_STORE_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """A principal's quotas, with store keys and QuotaFailure subjects precomputed."""

    requests: tuple[Rate, ...] = ()
    request_subjects: tuple[str, ...] = ()
    tokens: tuple[Rate, ...] = ()
    token_subjects: tuple[str, ...] = ()
    slots: tuple[Slot, ...] = ()
    slot_subjects: tuple[str, ...] = ()
    unlimited: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unlimited", not (self.requests or self.tokens or self.slots))


def _build_limits(
    principal: Principal, user: PlanLimits, tenant: PlanLimits, window_s: float
) -> QuotaLimits:
    tag = tenant_tag(principal.tenant)
    scopes = (
        (user, f"{tag}:u:{principal.user}", f"principal:{principal.tenant}/{principal.user}"),
        (tenant, f"{tag}:t", f"tenant:{principal.tenant}"),
    )
    requests, request_subjects, tokens, token_subjects = [], [], [], []
    slots, slot_subjects = [], []
    for limits, key, subject in scopes:
        if limits.requests_per_minute:
            requests.append(Rate(f"{key}:rpm", limits.requests_per_minute, window_s))
            request_subjects.append(subject)
        if limits.tokens_per_minute:
            tokens.append(Rate(f"{key}:tpm", limits.tokens_per_minute, window_s))
            token_subjects.append(subject)
        if limits.concurrent_streams:
            slots.append(Slot(f"{key}:streams", limits.concurrent_streams))
            slot_subjects.append(subject)
    return QuotaLimits(
        tuple(requests),
        tuple(request_subjects),
        tuple(tokens),
        tuple(token_subjects),
        tuple(slots),
        tuple(slot_subjects),
    )


class _Held:
    """A lease held by one call; released once, by whichever path gets there first."""

    __slots__ = ("lease", "released")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.released = False


class QuotaInterceptor(Interceptor):
    """Enforces :class:`QuotaConfig` on every call; see the module docstring.

    ``store`` defaults to the one the config names (memory or Redis), which the
    interceptor then starts and closes; a store passed in is its owner's to close.
    """

    def __init__(
        self,
        config: QuotaConfig,
        *,
        store: QuotaStore | None = None,
        exempt_services: Collection[str] = EXEMPT_SERVICES,
    ) -> None:
        config.validate()
        self.config = config
        self._owns_store = store is None
        if store is None:
            from tokenwire.quotas import create_quota_store

            store = create_quota_store(config)
        self.store = store
        self._exempt = frozenset(exempt_services)
        self._cache: dict[tuple[str, str, str], QuotaLimits] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._started = False
        # Set by the QuotaPolicy that shares this interceptor: Complete calls are then
        # admitted per turn, slot and request included (one store call for all three).
        self.turns_admit_calls = False

    async def start(self) -> None:
        """Connect the store; an unreachable one is a ConfigError unless ``fail_open``.

        Safe to call twice (the chain and the quota policy share this interceptor).
        """
        if not self.config.enabled or self._started:
            return
        self._started = True
        try:
            await self.store.start()
        except QuotaStoreError as exc:
            if not self.config.fail_open:
                raise ConfigError(
                    f"the quota store is unreachable at start-up ({exc}); "
                    "fix quotas.redis_url, or set quotas.fail_open = true to serve regardless"
                ) from exc
            _log.warning("quota store unreachable at start; admitting calls", error=str(exc))

    async def close(self) -> None:
        """Close the store if this interceptor opened it."""
        if not self._started:
            return
        self._started = False
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._owns_store:
            await self.store.close()

    def limits_for(self, principal: Principal) -> QuotaLimits:
        """The quotas that apply to ``principal`` (cached)."""
        cache_key = (principal.tenant, principal.user, principal.plan)
        limits = self._cache.get(cache_key)
        if limits is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            config = self.config
            limits = _build_limits(
                principal,
                config.plan_of(principal.plan),
                config.tenant_limits(principal.tenant),
                config.window_s,
            )
            self._cache[cache_key] = limits
        return limits

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        if not self.config.enabled or call.service in self._exempt:
            return await proceed(request, context)
        limits = self.limits_for(current_principal())
        if limits.unlimited or (
            self.turns_admit_calls
            and (call.method in CALL_TURN_METHODS or call.method in SLOT_PER_TURN_METHODS)
        ):
            return await proceed(request, context)
        converse = call.method in TURN_STREAM_METHODS
        held: _Held | None = None
        if limits.slots and (call.request_streaming or call.response_streaming):
            held = await self._acquire(limits)
            if held is not None:
                # Backstop: a call cancelled before its stream is first read never runs
                # the stream's finally; the end of the RPC releases the slot then.
                context.add_done_callback(self._on_done(held))
        try:
            if limits.requests and not converse:  # a Converse turn counts in QuotaPolicy
                await self.consume(limits)
            result = await proceed(request, context)
        except BaseException:
            if held is not None:
                await self._release(held)
            raise
        if held is None:
            return result
        if call.response_streaming:
            return self._holding(result, held)
        await self._release(held)  # client streaming: the call is over
        return result

    async def _holding(self, responses: AsyncIterator[Any], held: _Held) -> AsyncIterator[Any]:
        try:
            # Closed first, so the work behind the stream has stopped when the slot frees.
            async with closing(responses):
                async for response in responses:
                    yield response
        finally:
            # Before the final status goes out: a client that saw the end may open
            # its next stream at once and find the slot free.
            await self._release(held)

    def _on_done(self, held: _Held) -> Any:
        def done(_context: object) -> None:
            if not held.released:
                self._in_background(self._release(held))

        return done

    async def _acquire(self, limits: QuotaLimits) -> _Held | None:
        try:
            verdict, lease = await self.store.acquire(limits.slots)
        except QuotaStoreError as exc:
            self._store_down(exc)
            return None
        if lease is None:
            raise _refusal(
                _STREAMS,
                limits.slots,
                limits.slot_subjects,
                verdict,
                self.config.concurrency_retry_s,
            )
        return _Held(lease)

    async def _release(self, held: _Held) -> None:
        if held.released:
            return
        held.released = True
        try:
            await self.store.release(held.lease)
        except QuotaStoreError as exc:
            _log.warning("releasing a stream slot failed; its lease will expire", error=str(exc))
        except asyncio.CancelledError:
            # Cancelled again while releasing (a call torn down twice): finish in the
            # background rather than leave the slot held until its lease expires.
            self._in_background(self.store.release(held.lease))
            raise

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def consume(self, limits: QuotaLimits) -> None:
        """Count one request, or raise RESOURCE_EXHAUSTED."""
        try:
            verdict = await self.store.consume(limits.requests, 1)
        except QuotaStoreError as exc:
            self._store_down(exc)
            return
        if not verdict.allowed:
            raise _refusal(_REQUESTS, limits.requests, limits.request_subjects, verdict)

    async def reserve(self, limits: QuotaLimits, amount: int) -> Reservation | None:
        """Reserve ``amount`` tokens, or raise RESOURCE_EXHAUSTED (None: store down, open)."""
        try:
            verdict, reservation = await self.store.reserve(limits.tokens, amount)
        except QuotaStoreError as exc:
            self._store_down(exc)
            return None
        if reservation is None:
            raise _refusal(_TOKENS, limits.tokens, limits.token_subjects, verdict, amount=amount)
        return reservation

    async def admit(
        self, limits: QuotaLimits, amount: int, *, slots: bool, requests: bool
    ) -> Admission | None:
        """A turn's slot (if ``slots``), request (if ``requests``) and ``amount`` tokens in
        one store call, or RESOURCE_EXHAUSTED naming the quota (None: store down, open)."""
        try:
            admission = await self.store.admit(
                limits.slots if slots else (),
                limits.requests if requests else (),
                limits.tokens,
                amount,
            )
        except QuotaStoreError as exc:
            self._store_down(exc)
            return None
        if admission.refused == "streams":
            raise _refusal(
                _STREAMS,
                limits.slots,
                limits.slot_subjects,
                admission.verdict,
                self.config.concurrency_retry_s,
            )
        if admission.refused == "requests":
            raise _refusal(_REQUESTS, limits.requests, limits.request_subjects, admission.verdict)
        if admission.refused == "tokens":
            raise _refusal(
                _TOKENS, limits.tokens, limits.token_subjects, admission.verdict, amount=amount
            )
        return admission

    async def settle(self, reservation: Reservation, actual: int) -> None:
        """Settle a reservation to the tokens really used; never raises."""
        try:
            await self.store.settle(reservation, actual)
        except QuotaStoreError as exc:
            _log.warning(
                "settling a token reservation failed; it stays charged in full",
                reserved=reservation.amount,
                used=actual,
                error=str(exc),
            )

    def _store_down(self, exc: QuotaStoreError) -> None:
        if self.config.fail_open:
            _log.warning("quota store unreachable; admitting uncounted", error=str(exc))
            return
        raise UnavailableError(
            "quotas cannot be checked right now; retry shortly", retry_after_s=_STORE_RETRY_S
        ) from exc


def _refusal(
    quota: str,
    items: Sequence[Rate] | Sequence[Slot],
    subjects: Sequence[str],
    verdict: Verdict,
    retry_after_s: float | None = None,
    *,
    amount: int = 0,
) -> ResourceExhaustedError:
    failure = error_details_pb2.QuotaFailure()
    for index in verdict.violated:
        failure.violations.add(
            subject=subjects[index],
            description=quota,
            quota_id=quota,
            quota_value=items[index].limit,
        )
    first = verdict.violated[0] if verdict.violated else 0
    item, subject = items[first], subjects[first]
    if isinstance(item, Slot):
        delay = retry_after_s if retry_after_s is not None else verdict.retry_after_s
        message = (
            f"{quota} quota of {subject} exhausted: {item.limit} streams already open; "
            f"retry in {delay:g}s"
        )
        return ResourceExhaustedError(message, retry_after_s=delay, details=[failure])
    if verdict.retry_after_s == float("inf"):
        message = (
            f"this turn needs {amount} tokens (prompt + max_tokens), more than the {quota} "
            f"quota of {subject} ({item.limit} per {item.window_s:g}s) allows; lower max_tokens"
        )
        return ResourceExhaustedError(message, details=[failure])
    message = (
        f"{quota} quota of {subject} exhausted ({item.limit} per {item.window_s:g}s); "
        f"retry in {verdict.retry_after_s:g}s"
    )
    return ResourceExhaustedError(message, retry_after_s=verdict.retry_after_s, details=[failure])
