"""The Redis quota store: one budget shared exactly by every gateway process.

Each check-and-take is one Lua script (:mod:`tokenwire.quotas.redis_scripts`), so
it is atomic across all gateways, and all of them read one clock, Redis's own
(``TIME``), never their local ones. A turn's whole admission (stream slot, request,
tokens) is one script in one round trip; its settlement and release are queued and
ride along with the store's next call, or go on their own within 2 ms.

Rates (GCRA, see :mod:`tokenwire.quotas.store`): a key per rate holds its TAT in
milliseconds and expires when the bucket is full again, so idle callers leave
nothing behind. A reservation is charged in full when it is taken; settling
refunds (or charges) the difference. A gateway that dies before settling leaves
the full reservation charged, which drains out within one window.

Stream slots: a sorted set per slot key; member = lease id, score = the lease's
expiry (Redis time, ms). ``acquire`` first drops expired members, then adds the
lease to every set or to none. Each gateway renews all of its live leases in one
round trip every ``lease_ttl_s / 3`` seconds (renewal only extends members that
still exist, so it never resurrects a lease released meanwhile). A gateway that
is killed stops renewing, and its slots free themselves within ``lease_ttl_s``.

Keys that share a ``{hash tag}`` (the quota interceptor tags every key with its
tenant) land in one Redis Cluster slot, so each script touches one slot; the
renewal runs one script per tag.

    store = RedisQuotaStore("redis://127.0.0.1:6379/0", key_prefix="tokenwire:quota:")
    await store.start()
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from tokenwire.logs import get_logger
from tokenwire.quotas import redis_scripts as scripts
from tokenwire.quotas.store import (
    ALLOWED,
    Admission,
    Budget,
    BudgetCharge,
    Lease,
    QuotaStoreError,
    Rate,
    Reservation,
    Slot,
    Verdict,
    retry_delay,
)

__all__ = ["RedisQuotaStore"]

_log = get_logger("tokenwire.quotas")
_FLUSH_DELAY_S = 0.002  # how long a settlement or release waits for a call to ride with
# A script and its keys and arguments; no script: ZREM of a lease id from one slot key.
_Op = tuple[AsyncScript | None, list[str], list[Any]]


def _hash_tag(key: str) -> str:
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


@contextlib.asynccontextmanager
async def _redis_errors() -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise QuotaStoreError(f"Redis quota store unavailable: {exc}") from exc


class RedisQuotaStore:
    """Quota counters in Redis, shared by every gateway that uses the same ``key_prefix``.

    Pass ``client`` to share a connection pool (the store then does not close it).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "tokenwire:quota:",
        lease_ttl_s: float = 30.0,
        timeout_s: float = 1.0,
        client: aioredis.Redis | None = None,
    ) -> None:
        self._owns_client = client is None
        self._client = client or aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._prefix = key_prefix
        self._ttl_ms = int(lease_ttl_s * 1000)
        self._renew_every_s = lease_ttl_s / 3
        self._take = self._client.register_script(scripts.TAKE)
        self._settle = self._client.register_script(scripts.SETTLE)
        self._acquire = self._client.register_script(scripts.ACQUIRE)
        self._renew = self._client.register_script(scripts.RENEW)
        self._used = self._client.register_script(scripts.USED)
        self._in_use = self._client.register_script(scripts.IN_USE)
        self._admit = self._client.register_script(scripts.ADMIT)
        self._budget_charge = self._client.register_script(scripts.BUDGET_CHARGE)
        self._budget_settle = self._client.register_script(scripts.BUDGET_SETTLE)
        self._live: dict[str, Lease] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False
        # Settlements and releases not sent yet: they ride along with the next call
        # (one round trip for both), or go on their own after _FLUSH_DELAY_S.
        self._pending: list[_Op] = []
        self._flusher: asyncio.Task[None] | None = None

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._prefix

    async def start(self) -> None:
        """Check that Redis answers and start renewing leases."""
        async with _redis_errors():
            await self._client.ping()
        self._ensure_renewer()

    async def close(self) -> None:
        """Send what is pending, stop renewing, release the leases still held, close."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        try:
            await self._send([])
        except QuotaStoreError as exc:
            _log.warning("sending pending quota updates at close failed", error=str(exc))
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        for lease in list(self._live.values()):
            with contextlib.suppress(QuotaStoreError):
                await self.release(lease)
        if self._owns_client:
            await self._client.aclose()

    def _keys(self, items: Sequence[Rate] | Sequence[Slot]) -> list[str]:
        return [self._prefix + item.key for item in items]

    async def _run_take(
        self, rates: Sequence[Rate], cost: int
    ) -> tuple[Verdict, tuple[float, ...]]:
        args: list[float | int] = [cost]
        for rate in rates:
            args += [rate.limit, rate.window_s * 1000]
        async with _redis_errors():
            reply = await self._take(keys=self._keys(rates), args=args)
        if int(reply[0]) != 1:
            excess_s = float(reply[1]) / 1000
            violated = tuple(int(index) - 1 for index in reply[2:])
            return Verdict(False, retry_delay(excess_s), violated), ()
        return ALLOWED, tuple(float(mark) for mark in reply[2:])

    async def consume(self, rates: Sequence[Rate], cost: int) -> Verdict:
        """Take ``cost`` from every rate, or from none (one atomic script)."""
        return (await self._run_take(rates, cost))[0]

    async def reserve(
        self, rates: Sequence[Rate], amount: int
    ) -> tuple[Verdict, Reservation | None]:
        """Take ``amount`` from every rate, or none; settle the result later."""
        verdict, marks = await self._run_take(rates, amount)
        if not verdict.allowed:
            return verdict, None
        return verdict, Reservation(tuple(rates), amount, marks)

    async def settle(self, reservation: Reservation, actual: int) -> None:
        """Refund what the reservation did not use (while still in the bucket), or charge more."""
        diff = actual - reservation.amount
        if diff == 0:
            return
        args: list[float | int] = [diff]
        for rate, mark in zip(reservation.rates, reservation.marks, strict=True):
            args += [rate.limit, rate.window_s * 1000, mark]
        async with _redis_errors():
            await self._settle(keys=self._keys(reservation.rates), args=args)

    async def acquire(self, slots: Sequence[Slot]) -> tuple[Verdict, Lease | None]:
        """One slot on every key, or none; the lease is renewed until released."""
        lease = Lease(tuple(slots), uuid.uuid4().hex)
        args: list[str | int] = [lease.lease_id, self._ttl_ms, *(slot.limit for slot in slots)]
        async with _redis_errors():
            reply = await self._acquire(keys=self._keys(slots), args=args)
        if int(reply[0]) != 1:
            return Verdict(False, 0.0, tuple(int(index) - 1 for index in reply[1:])), None
        self._live[lease.lease_id] = lease
        self._ensure_renewer()
        return ALLOWED, lease

    async def release(self, lease: Lease) -> None:
        """Return the lease's slots; idempotent."""
        self._live.pop(lease.lease_id, None)
        async with _redis_errors():
            pipe = self._client.pipeline(transaction=False)
            for key in self._keys(lease.slots):
                pipe.zrem(key, lease.lease_id)
            await pipe.execute()

    async def admit(
        self, slots: Sequence[Slot], requests: Sequence[Rate], tokens: Sequence[Rate], amount: int
    ) -> Admission:
        """Slots, one request and ``amount`` tokens in one script, sent in one round trip
        with whatever settlements and releases are pending."""
        lease = Lease(tuple(slots), uuid.uuid4().hex) if slots else None
        args: list[str | int | float] = [len(slots), len(requests), len(tokens)]
        args += [lease.lease_id if lease else "", self._ttl_ms, *(slot.limit for slot in slots)]
        for rate in requests:
            args += [rate.limit, rate.window_s * 1000]
        args.append(amount)
        for rate in tokens:
            args += [rate.limit, rate.window_s * 1000]
        keys = self._keys(slots) + self._keys(requests) + self._keys(tokens)
        reply = (await self._send([(self._admit, keys, args)]))[-1]
        stage = int(reply[0])
        if stage:
            violated = tuple(int(index) - 1 for index in reply[2:])
            excess_s = float(reply[1]) / 1000
            delay = 0.0 if stage == 1 else retry_delay(excess_s)
            return Admission(Verdict(False, delay, violated), scripts.STAGES[stage])
        reservation = None
        if tokens:
            marks = tuple(float(mark) for mark in reply[2:])
            reservation = Reservation(tuple(tokens), amount, marks)
        if lease is not None:
            self._live[lease.lease_id] = lease
            self._ensure_renewer()
        return Admission(ALLOWED, "", lease, reservation)

    def finish(self, lease: Lease | None, reservation: Reservation | None, actual: int) -> None:
        """Queue the settlement and the release; the next call (or a flush within
        milliseconds) sends them."""
        if reservation is not None and actual != reservation.amount:
            args: list[str | int | float] = [actual - reservation.amount]
            for rate, mark in zip(reservation.rates, reservation.marks, strict=True):
                args += [rate.limit, rate.window_s * 1000, mark]
            self._pending.append((self._settle, self._keys(reservation.rates), args))
        if lease is not None:
            self._live.pop(lease.lease_id, None)
            for key in self._keys(lease.slots):
                self._pending.append((None, [key], [lease.lease_id]))
        if self._pending and self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def charge_budget(self, budget: Budget, amount: int) -> tuple[int, BudgetCharge | None]:
        """Add ``amount`` to the period's counter unless it would pass the limit: one
        script, sent in one round trip with whatever settlements are pending."""
        args = [budget.limit, amount, int(budget.expires_at * 1000)]
        op: _Op = (self._budget_charge, [self._prefix + budget.key], args)
        allowed, used = (await self._send([op]))[-1]
        return int(used), BudgetCharge(budget, amount) if int(allowed) == 1 else None

    def settle_budget(self, charge: BudgetCharge, actual: int) -> None:
        """Queue the correction; the next call (or a flush within milliseconds) sends it."""
        if actual == charge.amount:
            return
        key = self._prefix + charge.budget.key
        self._pending.append((self._budget_settle, [key], [actual - charge.amount]))
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def budget_used(self, budget: Budget) -> int:
        """Units the period's counter holds (pending settlements sent first)."""
        await self._send([])
        async with _redis_errors():
            return int(await self._client.get(self._prefix + budget.key) or 0)

    async def _flush_soon(self) -> None:
        await asyncio.sleep(_FLUSH_DELAY_S)
        self._flusher = None
        try:
            await self._send([])
        except QuotaStoreError as exc:
            _log.warning(
                "sending quota settlements failed; reservations stay charged and "
                "leases expire on their own",
                error=str(exc),
            )

    async def _send(self, ops: list[_Op]) -> list[Any]:
        """Pending ops, then ``ops``, in one pipeline (one round trip): scripts by
        their SHA, loaded again if Redis forgot them. The replies of ``ops``."""
        batch, self._pending = [*self._pending, *ops], []
        if not batch:
            return []
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            for script, keys, args in batch:
                if script is None:  # a release
                    pipe.zrem(keys[0], *args)
                else:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                async with _redis_errors():
                    replies = await pipe.execute()
            except QuotaStoreError as exc:
                if attempt == 1 and isinstance(exc.__cause__, NoScriptError):
                    await self._load_scripts()
                    continue
                raise
            return list(replies[len(batch) - len(ops) :])
        raise AssertionError("unreachable")  # pragma: no cover

    async def _load_scripts(self) -> None:
        async with _redis_errors():
            for script in (self._admit, self._settle, self._budget_charge, self._budget_settle):
                await self._client.script_load(script.script)

    async def used(self, rate: Rate) -> float:
        """Units the bucket still counts."""
        await self._send([])
        async with _redis_errors():
            reply = await self._used(
                keys=self._keys([rate]), args=[rate.limit, rate.window_s * 1000]
            )
        return float(reply)

    async def in_use(self, slot: Slot) -> int:
        """Live (unexpired) leases on the slot's key."""
        await self._send([])
        async with _redis_errors():
            return int(await self._in_use(keys=self._keys([slot])))

    async def renew(self) -> None:
        """Extend every live lease of this store by ``lease_ttl_s``: one round trip."""
        groups: dict[str, dict[str, list[str]]] = {}
        for lease in list(self._live.values()):
            for key in self._keys(lease.slots):
                groups.setdefault(_hash_tag(key), {}).setdefault(key, []).append(lease.lease_id)
        if not groups:
            return
        async with _redis_errors():
            pipe = self._client.pipeline(transaction=False)
            for members in groups.values():
                args: list[str | int] = [self._ttl_ms]
                for ids in members.values():
                    args += [len(ids), *ids]
                await self._renew(keys=list(members), args=args, client=pipe)
            await pipe.execute()

    def _ensure_renewer(self) -> None:
        if self._renewer is None and not self._closed:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every_s)
            try:
                await self.renew()
            except QuotaStoreError as exc:
                _log.warning("renewing stream slot leases failed", error=str(exc))
            except Exception:
                _log.exception("renewing stream slot leases failed")
