"""The Redis abuse store: one set of counts and suspensions shared by every gateway.

Each operation is one Lua script (:mod:`tokenwire.abuse.redis_scripts`), atomic
across gateways and timed by Redis's own clock; :meth:`RedisAbuseStore.record`
sends a whole batch of flags as one pipeline, so recording costs one round trip
however many flags the batch holds, and each standing read is one more.

Keys: ``PREFIX{tenant}:flags:USER``, ``...:suspension:USER`` and
``...:throttle:USER`` per account (the tenant is the Redis Cluster hash tag, as
for the quota keys), and ``PREFIX{policies}`` with its ``:version`` counter for
the tenant policies. Flags expire with the window, a timed suspension with its
end, a throttle bucket once it is full again: idle accounts leave nothing behind.

    store = RedisAbuseStore("redis://127.0.0.1:6379/0", AbuseRules(), key_prefix="tw:abuse:")
    await store.start()
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from tokenwire.abuse import redis_scripts as scripts
from tokenwire.abuse.store import (
    AbuseRules,
    AbuseStoreError,
    Account,
    Flag,
    Standing,
    TenantPolicy,
    suspension_reason,
)
from tokenwire.quotas.store import retry_delay, tenant_tag

__all__ = ["RedisAbuseStore"]

_Op = tuple[AsyncScript, list[str], list[Any]]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _standing(reply: Sequence[Any], rules: AbuseRules) -> Standing:
    flags = int(reply[0])
    if int(reply[1]) != 1:
        return Standing(flags, rules.throttled(flags))
    return Standing(
        flags,
        rules.throttled(flags),
        True,
        _text(reply[2]),
        int(reply[3]) / 1000,
        int(reply[4]) / 1000,
    )


@contextlib.asynccontextmanager
async def _redis_errors() -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise AbuseStoreError(f"Redis abuse store unavailable: {exc}") from exc


class RedisAbuseStore:
    """Abuse counters in Redis, shared by every gateway that uses the same ``key_prefix``.

    Pass ``client`` to share a connection pool (the store then does not close it).
    """

    def __init__(
        self,
        url: str,
        rules: AbuseRules,
        *,
        key_prefix: str = "tokenwire:abuse:",
        timeout_s: float = 1.0,
        client: aioredis.Redis | None = None,
    ) -> None:
        self.rules = rules
        self._owns_client = client is None
        self._client = client or aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._prefix = key_prefix
        self._window_ms = int(rules.window_s * 1000)
        self._record = self._client.register_script(scripts.RECORD)
        self._standing = self._client.register_script(scripts.STANDING)
        self._admit = self._client.register_script(scripts.ADMIT_TURN)
        self._lift = self._client.register_script(scripts.LIFT)
        self._policies = self._client.register_script(scripts.POLICIES)
        self._set_policy = self._client.register_script(scripts.SET_POLICY)
        self._policy_keys = [f"{key_prefix}{{policies}}", f"{key_prefix}{{policies}}:version"]

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._prefix

    async def start(self) -> None:
        """Check that Redis answers."""
        async with _redis_errors():
            await self._client.ping()

    async def close(self) -> None:
        """Close the connection pool (when this store made it)."""
        if self._owns_client:
            await self._client.aclose()

    def _keys(self, account: Account, *kinds: str) -> list[str]:
        base = f"{self._prefix}{tenant_tag(account.tenant)}"
        return [f"{base}:{kind}:{account.user}" for kind in kinds]

    async def record(self, flags: Sequence[Flag]) -> list[Standing]:
        """Count each flag: one script per flag, all in one pipeline (one round trip)."""
        rules = self.rules
        length_ms = int(rules.suspend_s * 1000)
        ops: list[_Op] = []
        for flag in flags:
            # The script puts the count between the reason's two halves.
            reason = suspension_reason("\0", rules.window_s, flag.category)
            prefix, _, suffix = reason.partition("\0")
            args = [self._window_ms, uuid.uuid4().hex, rules.count_cap, rules.suspend_after]
            args += [length_ms, prefix, suffix]
            ops.append((self._record, self._keys(flag.account, "flags", "suspension"), args))
        return [_standing(reply, rules) for reply in await self._send(ops)]

    async def standing(self, account: Account) -> Standing:
        """The account's standing now: one script."""
        keys = self._keys(account, "flags", "suspension")
        (reply,) = await self._send([(self._standing, keys, [self._window_ms])])
        return _standing(reply, self.rules)

    async def admit_turn(self, account: Account) -> tuple[Standing, float]:
        """The standing and, for a throttled account, a turn from its bucket: one script."""
        rules = self.rules
        keys = self._keys(account, "flags", "suspension", "throttle")
        args = [self._window_ms, rules.throttle_after, rules.throttle_turns]
        args.append(int(rules.throttle_window_s * 1000))
        (reply,) = await self._send([(self._admit, keys, args)])
        wait_ms = int(reply[5])
        return _standing(reply, rules), retry_delay(wait_ms / 1000) if wait_ms else 0.0

    async def lift(self, account: Account) -> Standing:
        """End the suspension, forget the flags and the throttle: one script."""
        keys = self._keys(account, "flags", "suspension", "throttle")
        (reply,) = await self._send([(self._lift, keys, [self._window_ms])])
        return _standing(reply, self.rules)

    async def policies(self, known_version: int) -> tuple[int, dict[str, TenantPolicy] | None]:
        """The version, and every policy when it is not ``known_version``: one script."""
        (reply,) = await self._send([(self._policies, self._policy_keys, [known_version])])
        version = int(reply[0])
        if len(reply) == 1 and version == known_version:
            return version, None
        items = [_text(item) for item in reply[1:]]
        pairs = zip(items[::2], items[1::2], strict=True)
        return version, {tenant: _policy_from_json(body) for tenant, body in pairs}

    async def set_policy(self, tenant: str, policy: TenantPolicy) -> int:
        """Replace ``tenant``'s policy (empty: remove it): one script."""
        body = "" if policy.empty else _policy_json(policy)
        (reply,) = await self._send([(self._set_policy, self._policy_keys, [tenant, body])])
        return int(reply)

    async def _send(self, ops: list[_Op]) -> list[Any]:
        """``ops`` in one pipeline (one round trip), scripts by their SHA, loaded again
        if Redis forgot them; their replies."""
        if not ops:
            return []
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            for script, keys, args in ops:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                async with _redis_errors():
                    return list(await pipe.execute())
            except AbuseStoreError as exc:
                if attempt == 1 and isinstance(exc.__cause__, NoScriptError):
                    async with _redis_errors():
                        for script in {id(op[0]): op[0] for op in ops}.values():
                            await self._client.script_load(script.script)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover


def _policy_json(policy: TenantPolicy) -> str:
    return json.dumps({"actions": dict(policy.actions), "keep_text": policy.keep_text})


def _policy_from_json(body: str) -> TenantPolicy:
    try:
        data = json.loads(body)
        actions = {str(k): str(v) for k, v in dict(data.get("actions") or {}).items()}
        keep = data.get("keep_text")
        return TenantPolicy(actions, None if keep is None else bool(keep))
    except (ValueError, TypeError, AttributeError):
        return TenantPolicy()  # unreadable: the configuration applies
