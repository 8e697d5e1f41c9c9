"""The moderation events SQL both stores share: the columns, the page query, the rows.

SQLite and PostgreSQL keep the same ``moderation_events`` table (see their schema
modules) and list it with the same statement; only the parameter markers differ.
Pages are keyset pages, newest first: ``(recorded_at, event_id)`` below the last
row of the previous page.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Final

from tokenwire.stores.conversations import Page
from tokenwire.stores.cursors import (
    moderation_events_cursor,
    page_limit,
    read_moderation_events_cursor,
)
from tokenwire.stores.moderation_events import (
    ModerationEventQuery,
    ModerationEventRecord,
    check_event_query,
)
from tokenwire.stores.sqlite_database import write_transaction

__all__ = [
    "EVENT_COLUMNS",
    "event_values",
    "events_page",
    "insert_events_sqlite",
    "page_sql",
    "select_events_sqlite",
]

EVENT_COLUMNS: Final = (
    "event_id, recorded_at, tenant, user_name, turn_id, direction, category, moderator,"
    " score, action, text"
)
"""The ``moderation_events`` columns, in the order of :func:`event_values`."""


def event_values(event: ModerationEventRecord) -> tuple[Any, ...]:
    """``event``'s values in :data:`EVENT_COLUMNS` order."""
    return (
        event.event_id,
        event.recorded_at,
        event.tenant,
        event.user,
        event.turn_id,
        event.direction,
        event.category,
        event.moderator,
        event.score,
        event.action,
        event.text,
    )


def page_sql(query: ModerationEventQuery, marker: Callable[[int], str]) -> tuple[str, list[Any]]:
    """The page query of ``query`` (checked here, InvalidArgumentError) and its
    parameters; ``marker(n)`` is the n-th parameter's marker (``?`` or ``$n``). It asks
    for one row more than the page, which tells whether another page follows."""
    check_event_query(query)
    limit = page_limit(query.page_size)
    where: list[str] = []
    params: list[Any] = []

    def add(condition: str, *values: Any) -> None:
        markers = [marker(len(params) + i + 1) for i in range(len(values))]
        where.append(condition.format(*markers))
        params.extend(values)

    if query.tenant:
        add("tenant = {}", query.tenant)
    if query.user:
        add("user_name = {}", query.user)
    if query.since is not None:
        add("recorded_at >= {}", query.since)
    if query.until is not None:
        add("recorded_at < {}", query.until)
    if query.cursor:
        add("(recorded_at, event_id) < ({}, {})", *read_moderation_events_cursor(query.cursor))
    sql = f"SELECT {EVENT_COLUMNS} FROM moderation_events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY recorded_at DESC, event_id DESC LIMIT {marker(len(params) + 1)}"
    return sql, [*params, limit + 1]


def events_page(rows: Sequence[Sequence[Any]], page_size: int) -> Page[ModerationEventRecord]:
    """The page of :func:`page_sql`'s rows, with the cursor of the next (if any)."""
    limit = page_limit(page_size)
    events = [_record(row) for row in rows]
    if len(events) <= limit:
        return Page(events)
    last = events[limit - 1]
    cursor = moderation_events_cursor(recorded_at=last.recorded_at, event_id=last.event_id)
    return Page(events[:limit], cursor)


def _record(r: Sequence[Any]) -> ModerationEventRecord:
    return ModerationEventRecord(
        str(r[0]), float(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6]),
        str(r[7]), float(r[8]), str(r[9]), str(r[10]),
    )  # fmt: skip


def insert_events_sqlite(conn: sqlite3.Connection, events: Sequence[ModerationEventRecord]) -> None:
    """Write a batch of events in one SQLite transaction (ids already kept are ignored)."""
    with write_transaction(conn):
        conn.executemany(
            f"INSERT OR IGNORE INTO moderation_events ({EVENT_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [event_values(event) for event in events],
        )


def select_events_sqlite(
    conn: sqlite3.Connection, sql: str, params: Sequence[Any], page_size: int
) -> Page[ModerationEventRecord]:
    """A page of events from SQLite, by :func:`page_sql`'s query."""
    return events_page(conn.execute(sql, params).fetchall(), page_size)
