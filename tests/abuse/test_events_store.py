"""The moderation events table of the conversation stores, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import POSTGRES_DSN, postgres_problem, require_service
from tests.stores.conftest import Backend, drop_schema, fresh_schema
from tokenwire.errors import InvalidArgumentError
from tokenwire.stores import new_id
from tokenwire.stores.moderation_events import (
    ModerationEventQuery,
    ModerationEventRecord,
    ModerationEventStore,
)

T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """An open conversation store of each kind, on a database of this test's own."""
    if request.param == "sqlite":
        kit = Backend("sqlite", path=tmp_path / "conversations.db")
        yield await kit.open_store()
        await kit.close()
        return
    require_service("PostgreSQL", POSTGRES_DSN, postgres_problem())
    kit = Backend("postgres", schema=fresh_schema())
    try:
        yield await kit.open_store()
        await kit.close()
    finally:
        await drop_schema(kit.schema)


def event(tenant: str, user: str, at: float, **fields: Any) -> ModerationEventRecord:
    """A flagged input event of a fresh turn."""
    return ModerationEventRecord(
        event_id=fields.pop("event_id", new_id("flag")),
        recorded_at=at,
        tenant=tenant,
        user=user,
        turn_id=fields.pop("turn_id", new_id("turn")),
        direction=fields.pop("direction", "input"),
        category=fields.pop("category", "violence"),
        moderator="rules",
        score=fields.pop("score", 1.0),
        action=fields.pop("action", "block"),
        text=fields.pop("text", ""),
    )


EVENTS = (
    event("acme", "alice", T0, text="kept text", action="log", score=0.75),
    event("acme", "alice", T0 + 1, direction="output"),
    event("acme", "bob", T0 + 2, category="hate", action="allow"),
    event("globex", "alice", T0 + 3),
    event("acme", "alice", T0 + 4),
)


async def test_both_stores_keep_moderation_events(store: Any) -> None:
    """The SQL stores are moderation event stores."""
    assert isinstance(store, ModerationEventStore)


async def test_events_are_listed_newest_first_exactly_as_written(store: Any) -> None:
    """Every field comes back as written; a second write of an id changes nothing."""
    await store.record_moderation_events(EVENTS)
    await store.record_moderation_events(EVENTS[:1])
    page = await store.list_moderation_events(ModerationEventQuery())
    assert (list(reversed(EVENTS)), "") == (page.items, page.next_cursor)


async def test_filters_by_tenant_user_and_time(store: Any) -> None:
    """A tenant, a user of it, and a half-open time range each narrow the listing."""
    await store.record_moderation_events(EVENTS)

    async def ids(**query: Any) -> list[str]:
        page = await store.list_moderation_events(ModerationEventQuery(**query))
        return [e.event_id for e in page.items]

    alice = [EVENTS[4].event_id, EVENTS[1].event_id, EVENTS[0].event_id]
    assert [EVENTS[4].event_id, *[e.event_id for e in EVENTS[2::-1]]] == await ids(tenant="acme")
    assert alice == await ids(tenant="acme", user="alice")
    assert [EVENTS[1].event_id] == await ids(tenant="acme", since=T0 + 1, until=T0 + 2)
    assert [EVENTS[3].event_id] == await ids(tenant="globex")


async def test_pages_walk_every_event_once(store: Any) -> None:
    """Pages of two, events of equal times included, cover all events once, newest first."""
    batch = [event("acme", "alice", T0 + (i // 2)) for i in range(7)]
    await store.record_moderation_events(batch)
    seen: list[str] = []
    cursor = ""
    while True:
        page = await store.list_moderation_events(ModerationEventQuery(page_size=2, cursor=cursor))
        seen += [e.event_id for e in page.items]
        cursor = page.next_cursor
        if not cursor:
            break
    expected = sorted(batch, key=lambda e: (e.recorded_at, e.event_id), reverse=True)
    assert [e.event_id for e in expected] == seen


@pytest.mark.parametrize(
    "query",
    [
        ModerationEventQuery(user="alice"),
        ModerationEventQuery(since=T0 + 5, until=T0),
        ModerationEventQuery(page_size=0),
        ModerationEventQuery(cursor="v1.bm90LWEtY3Vyc29y"),
    ],
)
async def test_bad_queries_are_invalid_arguments(store: Any, query: ModerationEventQuery) -> None:
    """A user without a tenant, an empty range, no page size or a foreign token are refused."""
    with pytest.raises(InvalidArgumentError):
        await store.list_moderation_events(query)
