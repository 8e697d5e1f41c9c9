"""The Redis quota store: one budget shared exactly by every gateway process.

Each check-and-take is one Lua script, so it is atomic across all gateways, and
all of them read one clock, Redis's own (``TIME``), never their local ones.

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
from tokenwire.quotas.store import (
    ALLOWED,
    Admission,
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

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""

# KEYS: rate keys. ARGV: cost, then limit and window (ms) per key.
# Returns {1, '0', mark...} or {0, excess_ms, violated index (1-based)...}.
_TAKE = (
    _NOW
    + """
local cost = tonumber(ARGV[1])
local marks, violated, worst = {}, {}, 0
for i, key in ipairs(KEYS) do
  local limit, window = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local need = cost * window / limit
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local excess = tat + need - now - window
  if need > window + 1e-6 then excess = math.huge end
  if excess > 1e-6 then
    violated[#violated + 1] = i
    if excess > worst then worst = excess end
  end
  marks[i] = tat + need
end
if #violated > 0 then
  local out = {0, string.format('%.6f', worst)}
  for _, i in ipairs(violated) do out[#out + 1] = i end
  return out
end
local out = {1, '0'}
for i, key in ipairs(KEYS) do
  local ttl = string.format('%d', math.ceil(marks[i] - now) + 1000)
  redis.call('SET', key, string.format('%.3f', marks[i]), 'PX', ttl)
  out[#out + 1] = string.format('%.3f', marks[i])
end
return out
"""
)

# KEYS: rate keys. ARGV: diff (actual - reserved), then limit, window (ms), mark per key.
_SETTLE = (
    _NOW
    + """
local diff = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local limit, window = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local mark = tonumber(ARGV[3 * i + 1])
  local interval = window / limit
  local tat = tonumber(redis.call('GET', key))
  if diff < 0 then
    if tat then
      local back, left = -diff * interval, mark - now
      if left < 0 then left = 0 end
      if back > left then back = left end
      tat = tat - back
    end
  else
    if not tat or tat < now then tat = now end
    tat = tat + diff * interval
  end
  if tat and tat > now then
    local ttl = string.format('%d', math.ceil(tat - now) + 1000)
    redis.call('SET', key, string.format('%.3f', tat), 'PX', ttl)
  elseif tat then
    redis.call('DEL', key)
  end
end
return 1
"""
)

# KEYS: slot keys. ARGV: lease id, ttl (ms), then limit per key.
# Returns {1} or {0, violated index (1-based)...}.
_ACQUIRE = (
    _NOW
    + """
local violated = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.3f', now))
  if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then violated[#violated + 1] = i end
end
if #violated > 0 then
  local out = {0}
  for _, i in ipairs(violated) do out[#out + 1] = i end
  return out
end
local ttl = tonumber(ARGV[2])
local expiry = string.format('%.3f', now + ttl)
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, expiry, ARGV[1])
  redis.call('PEXPIRE', key, string.format('%d', ttl + 1000))
end
return {1}
"""
)

# A turn's admission. KEYS: slot keys, request rate keys, token rate keys.
# ARGV: slot count, request count, token count, lease id, ttl (ms), a limit per slot,
# limit and window (ms) per request rate, the token amount, limit and window per token rate.
# Returns {0, '0', token mark...} (admitted), or {stage, excess_ms, violated index
# (1-based, within the stage)...}: stage 1 slots, 2 requests, 3 tokens.
_ADMIT = (
    _NOW
    + """
local ns, nr, nt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, ttl = ARGV[4], tonumber(ARGV[5])
local a = 6
local busy = {}
for i = 1, ns do
  local key = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.3f', now))
  if redis.call('ZCARD', key) >= tonumber(ARGV[a + i - 1]) then busy[#busy + 1] = i end
end
if #busy > 0 then
  local out = {1, '0'}
  for _, i in ipairs(busy) do out[#out + 1] = i end
  return out
end
a = a + ns
local function check(first, count, cost, at)
  local marks, violated, worst = {}, {}, 0
  for i = 1, count do
    local limit, window = tonumber(ARGV[at + 2 * i - 2]), tonumber(ARGV[at + 2 * i - 1])
    local need = cost * window / limit
    local tat = tonumber(redis.call('GET', KEYS[first + i])) or now
    if tat < now then tat = now end
    local excess = tat + need - now - window
    if need > window + 1e-6 then excess = math.huge end
    if excess > 1e-6 then
      violated[#violated + 1] = i
      if excess > worst then worst = excess end
    end
    marks[i] = tat + need
  end
  return marks, violated, worst
end
local function apply(first, marks)
  for i, mark in ipairs(marks) do
    local ttl_ms = string.format('%d', math.ceil(mark - now) + 1000)
    redis.call('SET', KEYS[first + i], string.format('%.3f', mark), 'PX', ttl_ms)
  end
end
local function refuse(stage, violated, worst)
  local out = {stage, string.format('%.6f', worst)}
  for _, i in ipairs(violated) do out[#out + 1] = i end
  return out
end
local rmarks, rviolated, rworst = check(ns, nr, 1, a)
if #rviolated > 0 then return refuse(2, rviolated, rworst) end
a = a + 2 * nr
local amount = tonumber(ARGV[a])
local tmarks, tviolated, tworst = check(ns + nr, nt, amount, a + 1)
apply(ns, rmarks)
if #tviolated > 0 then return refuse(3, tviolated, tworst) end
apply(ns + nr, tmarks)
local expiry = string.format('%.3f', now + ttl)
for i = 1, ns do
  redis.call('ZADD', KEYS[i], expiry, lease)
  redis.call('PEXPIRE', KEYS[i], string.format('%d', ttl + 1000))
end
local out = {0, '0'}
for _, mark in ipairs(tmarks) do out[#out + 1] = string.format('%.3f', mark) end
return out
"""
)
_STAGES = {1: "streams", 2: "requests", 3: "tokens"}

# KEYS: slot keys. ARGV: ttl (ms), then per key: a count and that many lease ids.
_RENEW = (
    _NOW
    + """
local ttl = tonumber(ARGV[1])
local expiry = string.format('%.3f', now + ttl)
local pos = 2
for _, key in ipairs(KEYS) do
  local count = tonumber(ARGV[pos])
  for j = 1, count do
    redis.call('ZADD', key, 'XX', expiry, ARGV[pos + j])
  end
  pos = pos + count + 1
  redis.call('PEXPIRE', key, string.format('%d', ttl + 1000))
end
return 1
"""
)

# KEYS[1]: a rate key. ARGV: limit, window (ms). Returns the units in the bucket.
_USED = (
    _NOW
    + """
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat <= now then return '0' end
return string.format('%.6f', (tat - now) * tonumber(ARGV[1]) / tonumber(ARGV[2]))
"""
)

# KEYS[1]: a slot key. Returns the live leases.
_IN_USE = _NOW + "return redis.call('ZCOUNT', KEYS[1], string.format('(%.3f', now), '+inf')"


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
        self._take = self._client.register_script(_TAKE)
        self._settle = self._client.register_script(_SETTLE)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._renew = self._client.register_script(_RENEW)
        self._used = self._client.register_script(_USED)
        self._in_use = self._client.register_script(_IN_USE)
        self._admit = self._client.register_script(_ADMIT)
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
            return Admission(Verdict(False, delay, violated), _STAGES[stage])
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
            for script in (self._admit, self._settle):
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
