"""The usage SQL both stores share: the grouping expressions and the totals query.

SQLite and PostgreSQL read the same ``usage_records`` table (see their schema
modules) with the same statement; only the parameter markers differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from tokenwire.stores.usage import UsageRecord, UsageTotal

__all__ = ["USAGE_COLUMNS", "record_values", "totals_from_rows", "totals_sql"]

USAGE_COLUMNS: Final = (
    "turn_id, tenant, user_name, api_key_id, model, finish_reason, prompt_tokens,"
    " completion_tokens, recorded_at"
)
"""The ``usage_records`` columns, in the order of :func:`record_values`."""

# The group key of each grouping; fixed strings, never caller input.
_KEYS: Final = {
    "tenant": "tenant",
    "user": "tenant || '/' || user_name",
    "model": "model",
}


def record_values(record: UsageRecord) -> tuple[Any, ...]:
    """``record``'s values in :data:`USAGE_COLUMNS` order."""
    return (
        record.turn_id,
        record.tenant,
        record.user,
        record.api_key_id,
        record.model,
        record.finish_reason,
        record.prompt_tokens,
        record.completion_tokens,
        record.recorded_at,
    )


def totals_sql(group_by: str, *, tenant: bool, markers: Sequence[str]) -> str:
    """The totals query for ``group_by`` (checked by the caller), with ``markers`` for
    start, end and (when ``tenant``) the tenant: ``("?", "?", "?")`` or ``("$1", …)``."""
    key = _KEYS[group_by]
    where = f"recorded_at >= {markers[0]} AND recorded_at < {markers[1]}"
    if tenant:
        where += f" AND tenant = {markers[2]}"
    return (
        f"SELECT {key} AS key, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens)"
        f" FROM usage_records WHERE {where} GROUP BY 1, 2"
    )


def totals_from_rows(rows: Sequence[Sequence[Any]]) -> list[UsageTotal]:
    """:class:`UsageTotal` rows from :func:`totals_sql`, sorted by key then model.

    Sorted here, not in SQL: PostgreSQL's collation may order text unlike SQLite's.
    """
    totals = [UsageTotal(str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]
    return sorted(totals, key=lambda total: (total.key, total.model))
