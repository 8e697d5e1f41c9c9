"""Usage through a real server with API keys: recorded per turn, reported by GetUsage."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import defaultdict
from contextlib import closing
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tests.auth.conftest import bearer
from tests.usage.conftest import Keys, complete, refused_complete, usage_server
from tokenwire.auth import SQLiteKeyStore
from tokenwire.errors import InvalidArgumentError
from tokenwire.proto.v1 import admin_pb2, chat_pb2
from tokenwire.stores import SQLiteConversationStore
from tokenwire.testing import FakeBackend
from tokenwire.turns.policy import FilterResult, OutputFilter, TurnInfo, TurnOutcome
from tokenwire.usage import UsageConfig

PRICES = "fake=prompt:0.15 completion:0.6"
TENANT = admin_pb2.USAGE_GROUP_BY_TENANT
USER = admin_pb2.USAGE_GROUP_BY_USER
MODEL = admin_pb2.USAGE_GROUP_BY_MODEL


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def usage_request(
    group_by: int, tenant: str = "", start: float | None = None, end: float | None = None
) -> admin_pb2.GetUsageRequest:
    """GetUsage over the last hour (and the next minute) unless told otherwise."""
    now = time.time()
    return admin_pb2.GetUsageRequest(
        start_time=_stamp(now - 3600 if start is None else start),
        end_time=_stamp(now + 60 if end is None else end),
        group_by=group_by,  # type: ignore[arg-type]
        tenant=tenant,
    )


def rows(response: admin_pb2.GetUsageResponse) -> list[tuple[str, int, int, int, int]]:
    """Each row as (key, turns, prompt tokens, completion tokens, cost micros)."""
    return [
        (r.key, r.turns, r.prompt_tokens, r.completion_tokens, r.cost_micros) for r in response.rows
    ]


def micros(prompt: int, completion: int) -> int:
    """The cost of these fake-model tokens at PRICES, in micro-units, rounded half to even."""
    exact = prompt * Decimal("0.15") + completion * Decimal("0.6")
    return int(exact.to_integral_value())


async def test_get_usage_reports_each_tenants_turns_exactly(
    key_store: SQLiteKeyStore, keys: Keys
) -> None:
    """Turns of two tenants are reported by tenant, user and model with their exact
    tokens and costs; the tenant filter keeps one tenant."""
    config = UsageConfig(prices=PRICES, currency="EUR")  # type: ignore[arg-type]
    store = SQLiteConversationStore(":memory:")
    seen: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    async with usage_server(key_store, store, usage=config) as server:
        for key, user, message in [
            (keys.alice, "acme/alice", "Hello"),
            (keys.alice, "acme/alice", "A longer message to vary the prompt"),
            (keys.bob, "acme/bob", "Hi"),
            (keys.carol, "globex/carol", "Good morning"),
        ]:
            used = await complete(server.running, key, message)
            for group in (user, user.split("/")[0], "fake"):
                seen[group][0] += 1
                seen[group][1] += used.prompt_tokens
                seen[group][2] += used.completion_tokens
        admin = bearer(keys.admin.secret)
        by_tenant = await server.admin.GetUsage(usage_request(TENANT), metadata=admin)
        by_user = await server.admin.GetUsage(usage_request(USER), metadata=admin)
        by_model = await server.admin.GetUsage(usage_request(MODEL), metadata=admin)
        acme = await server.admin.GetUsage(usage_request(USER, "acme"), metadata=admin)

    def expected(*groups: str) -> list[tuple[str, int, int, int, int]]:
        return [(g, *seen[g], micros(*seen[g][1:])) for g in groups]  # type: ignore[misc]

    assert expected("acme", "globex") == rows(by_tenant)
    assert expected("acme/alice", "acme/bob", "globex/carol") == rows(by_user)
    assert expected("fake") == rows(by_model)
    assert expected("acme/alice", "acme/bob") == rows(acme)
    assert "EUR" == by_tenant.currency
    exact = seen["acme"][1] * Decimal("0.15") + seen["acme"][2] * Decimal("0.6")
    assert float(exact / 1_000_000) == by_tenant.rows[0].cost
    assert 0 < seen["globex"][1]


async def test_each_turn_records_its_key_model_and_finish_reason(
    key_store: SQLiteKeyStore, keys: Keys, tmp_path: Path
) -> None:
    """A row holds the tenant, user, the API key's id, the model, the finish reason and
    exactly the tokens the client was told."""
    database = tmp_path / "conversations.db"
    async with usage_server(key_store, SQLiteConversationStore(database)) as server:
        used = await complete(server.running, keys.carol, "Hello", max_tokens=2)
    with closing(sqlite3.connect(database)) as conn:
        stored = conn.execute(
            "SELECT tenant, user_name, api_key_id, model, finish_reason, prompt_tokens,"
            " completion_tokens FROM usage_records"
        ).fetchall()
    assert [
        ("globex", "carol", keys.carol.key.id, "fake", "length", used.prompt_tokens, 2)
    ] == stored


class _FlagEverything:
    """An output filter that cuts the answer at once."""

    synchronous = False

    async def feed(self, text: str) -> FilterResult:
        return FilterResult("", "test")

    async def flush(self) -> FilterResult:
        return FilterResult("")


class _CutPolicy:
    """A turn policy whose filter cuts every answer whose message says 'cut'."""

    async def before_turn(self, turn: TurnInfo) -> None:
        return None

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        return _FlagEverything() if "cut" in turn.message else None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        return None


async def test_turns_that_end_early_are_recorded_too(
    key_store: SQLiteKeyStore, keys: Keys, tmp_path: Path
) -> None:
    """Cancelled, filtered and failed turns each record the tokens they used."""
    database = tmp_path / "conversations.db"
    backend = FakeBackend(reply="abcdefgh", token_delay_s=0.02, fail_after=6)
    async with usage_server(
        key_store, SQLiteConversationStore(database), backend=backend, policies=[_CutPolicy()]
    ) as server:
        call = server.running.chat.Converse(metadata=bearer(keys.alice.secret))
        await call.write(
            chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message="go", idempotency_key=""))
        )
        while (await call.read()).WhichOneof("event") != "delta":
            pass
        await call.write(chat_pb2.ConverseRequest(cancel=chat_pb2.CancelTurn()))
        while (event := await call.read()).WhichOneof("event") != "finished":
            pass
        cancelled = event.finished
        await call.write(chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message="cut it")))
        while (event := await call.read()).WhichOneof("event") != "finished":
            pass
        filtered = event.finished
        await call.write(chat_pb2.ConverseRequest(start=chat_pb2.StartTurn(message="fail")))
        while (event := await call.read()).WhichOneof("event") != "error":
            pass
        await call.done_writing()
        await call.code()
    with closing(sqlite3.connect(database)) as conn:
        stored = conn.execute(
            "SELECT finish_reason, prompt_tokens, completion_tokens FROM usage_records"
            " ORDER BY recorded_at"
        ).fetchall()
    assert chat_pb2.FINISH_REASON_CANCELLED == cancelled.finish_reason
    assert chat_pb2.FINISH_REASON_CONTENT_FILTER == filtered.finish_reason
    assert [
        ("cancelled", cancelled.usage.prompt_tokens, cancelled.usage.completion_tokens),
        ("content_filter", filtered.usage.prompt_tokens, filtered.usage.completion_tokens),
    ] == stored[:2]
    assert (3, "error", 6) == (len(stored), stored[2][0], stored[2][2])
    assert stored[2][1] > 0


class _RefuseSecrets:
    """A turn policy that refuses every message saying 'secret' before it runs."""

    async def before_turn(self, turn: TurnInfo) -> None:
        if "secret" in turn.message:
            raise InvalidArgumentError("no secrets")

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        return None


async def test_turns_refused_before_the_engine_record_nothing(
    key_store: SQLiteKeyStore, keys: Keys
) -> None:
    """Refused by a policy after usage admitted it, by the budget, or as invalid: no row,
    and the budget charge of the policy-refused turn is given back."""
    config = UsageConfig(tenant_budgets={"acme": 150})  # type: ignore[arg-type]
    store = SQLiteConversationStore(":memory:")
    async with usage_server(key_store, store, usage=config, later=[_RefuseSecrets()]) as server:
        refusals = [
            (await refused_complete(server.running, keys.alice, "my secret", 10)).code,
            (await refused_complete(server.running, keys.alice, "x", max_tokens=10**6)).code,
            (await refused_complete(server.running, keys.alice, "x", max_tokens=1000)).code,
        ]
        assert server.policy.budgets is not None
        budget = server.policy.budgets.budget_of("acme")
        assert budget is not None
        charged = await server.policy.budgets.store.budget_used(budget)
        report = await server.admin.GetUsage(
            usage_request(TENANT), metadata=bearer(keys.admin.secret)
        )
    assert [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ] == refusals
    assert ([], 0) == (rows(report), charged)


async def test_only_admins_get_usage_and_bad_ranges_are_invalid(
    key_store: SQLiteKeyStore, keys: Keys
) -> None:
    """A caller without the admin role is PERMISSION_DENIED; a missing, empty or reversed
    range and a missing grouping are INVALID_ARGUMENT."""
    now = time.time()
    async with usage_server(key_store, SQLiteConversationStore(":memory:")) as server:
        admin = bearer(keys.admin.secret)
        codes = []
        for request, metadata in [
            (usage_request(TENANT), bearer(keys.alice.secret)),
            (admin_pb2.GetUsageRequest(group_by=TENANT), admin),
            (usage_request(TENANT, start=now, end=now), admin),
            (usage_request(TENANT, start=now, end=now - 1), admin),
            (usage_request(admin_pb2.USAGE_GROUP_BY_UNSPECIFIED), admin),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await server.admin.GetUsage(request, metadata=metadata)
            codes.append(caught.value.code())
    assert [grpc.StatusCode.PERMISSION_DENIED] + [grpc.StatusCode.INVALID_ARGUMENT] * 4 == codes


async def test_usage_is_read_once_the_client_saw_the_end(
    key_store: SQLiteKeyStore, keys: Keys
) -> None:
    """Turns finished at once are all in GetUsage right after their TurnFinished."""
    async with usage_server(key_store, SQLiteConversationStore(":memory:")) as server:
        await asyncio.gather(*(complete(server.running, keys.bob, f"m{i}") for i in range(8)))
        report = await server.admin.GetUsage(
            usage_request(USER), metadata=bearer(keys.admin.secret)
        )
    assert [("acme/bob", 8)] == [(r.key, r.turns) for r in report.rows]
