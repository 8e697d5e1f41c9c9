"""Conversation store cost: the same server over SQLite, PostgreSQL and a store that does nothing.

The same Tokenwire server (``running_server``, authentication off, no quotas,
output moderation as configured by default) over a fake engine that answers
every turn with 32 tokens at once, runs with three conversation stores:

* **none**: :class:`NullStore`, which stores nothing and answers at once (no
  history is read, no write is made): the floor;
* **sqlite**: the embedded default, a SQLite file in a temporary directory;
* **postgres**: PostgreSQL at ``--postgres-dsn`` (default the test database on
  127.0.0.1:5432) in a schema of its own, dropped afterwards; skipped, and said
  so, when it does not answer.

Each of 64 clients (``--concurrency``) continues its own conversation turn after
turn, so every turn reads its history and makes the store's two writes (the
user's message before the model starts, the answer when it ends) while the
other conversations do the same. The load, the interleaved rounds, the medians
and the client in its own process are those of :mod:`benchmarks.measure`. It
prints, per arm, turns/s, its ratio to none's, the TTFT p50, and the store's
share of it: ``(arm's TTFT - none's TTFT) / arm's TTFT``.

    python -m benchmarks.conversation_store            # about 1.5 minutes on 2 cores
    python -m benchmarks.conversation_store --quick    # about 20 seconds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from benchmarks import measure
from benchmarks.loadgen import LoadJob
from tokenwire.config import LoggingConfig
from tokenwire.errors import NotFoundError
from tokenwire.logs import configure_logging
from tokenwire.stores.conversations import (
    BegunTurn,
    Conversation,
    ConversationStore,
    Page,
    StoredMessage,
    TurnEnd,
    TurnRecord,
    new_id,
)
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.stores.usage import UsageRecord, UsageTotal
from tokenwire.testing import FakeBackend, config_for_tests, running_server

__all__ = [
    "DEFAULT",
    "QUICK",
    "NullStore",
    "StoreReport",
    "StoreSettings",
    "main",
    "measure_stores",
]

_ARMS = ("none", "sqlite", "postgres")
_DEFAULT_DSN = "postgresql://127.0.0.1:5432/test"


class NullStore:
    """A :class:`~tokenwire.stores.ConversationStore` that keeps nothing: the floor.

    Every turn starts a conversation that is never read back; ``begin_turn`` and
    ``finish_turn`` return at once without awaiting anything.
    """

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def begin_turn(
        self,
        owner: str,
        conversation_id: str,
        *,
        title: str,
        content: str,
        turn_id: str,
        answer_id: str,
        model: str,
        idempotency_key: str = "",
    ) -> BegunTurn:
        conversation_id = conversation_id or new_id("conv")
        message = StoredMessage(new_id("msg"), conversation_id, "user", content, 0.0, turn_id, True)
        turn = TurnRecord(turn_id, conversation_id, message.id, answer_id, model, "", True)
        return BegunTurn(turn, message, replayed=False)

    async def finish_turn(
        self, owner: str, conversation_id: str, turn_id: str, answer_id: str, end: TurnEnd
    ) -> bool:
        return True

    async def list_messages(
        self, owner: str, conversation_id: str, *, limit: int | None = None
    ) -> list[StoredMessage]:
        return []

    async def _missing(self, *args: Any, **kwargs: Any) -> Any:
        raise NotFoundError("the null store keeps nothing")

    create_conversation = get_conversation = add_message = discard_turn = _missing
    get_turn = rename_conversation = delete_conversation = _missing

    async def list_conversations(
        self, owner: str, *, page_size: int, cursor: str = ""
    ) -> Page[Conversation]:
        return Page([])

    async def page_messages(
        self, owner: str, conversation_id: str, *, page_size: int, cursor: str = ""
    ) -> Page[StoredMessage]:
        return Page([])

    async def record_usage(self, record: UsageRecord) -> None:
        return None

    async def usage_totals(
        self, *, start: float, end: float, group_by: str, tenant: str = ""
    ) -> list[UsageTotal]:
        return []


@dataclass(frozen=True, slots=True)
class StoreSettings(measure.RunSettings):
    """What to measure and for how long."""

    concurrency: tuple[int, ...] = (64,)
    max_tokens: int = 32  # one chunk of 32 tokens per turn: the turn, not the stream, is measured
    tokens_per_run: int = 64 * 32 * 6
    min_turns: int = 4
    rounds: int = 3
    postgres_dsn: str = _DEFAULT_DSN


DEFAULT = StoreSettings()
QUICK = replace(DEFAULT, tokens_per_run=64 * 32 * 3, rounds=1)


@dataclass(slots=True)
class StoreRow:
    """One concurrency: every arm's runs."""

    clients: int
    turns: int  # per client and measurement
    arms: dict[str, measure.ArmResult] = field(default_factory=dict)

    def turns_ratio(self, arm: str) -> float:
        """The arm's median turns/s over none's."""
        base = self.arms["none"].turns_per_s
        return self.arms[arm].turns_per_s / base if base > 0 else math.nan

    def ttft_share(self, arm: str) -> float:
        """The store's share of the arm's TTFT p50: (arm - none) / arm."""
        ttft = self.arms[arm].ttft_p50_ms
        return (ttft - self.arms["none"].ttft_p50_ms) / ttft if ttft > 0 else math.nan


@dataclass(slots=True)
class StoreReport:
    """Everything one run measured."""

    settings: StoreSettings
    rows: list[StoreRow]
    skipped: dict[str, str]  # arm → why
    elapsed_s: float

    @property
    def failed_turns(self) -> int:
        return sum(arm.failed_turns for row in self.rows for arm in row.arms.values())

    def summary(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "skipped": self.skipped,
            "elapsed_s": round(self.elapsed_s, 2),
            "rows": [
                {
                    "streams": row.clients,
                    "turns_per_client": row.turns,
                    **{
                        name: {
                            **arm.summary(),
                            "turns_ratio": measure.finite(row.turns_ratio(name), 4),
                            "ttft_share": measure.finite(row.ttft_share(name), 4),
                        }
                        for name, arm in row.arms.items()
                    },
                }
                for row in self.rows
            ],
        }


async def _postgres_store(dsn: str, schema: str) -> ConversationStore:
    from tokenwire.stores.postgres import PostgresConversationStore

    return PostgresConversationStore(dsn, schema=schema, pool_size=10)


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def _servers(
    settings: StoreSettings, data_dir: str, streams: int
) -> AsyncIterator[tuple[dict[str, str], dict[str, str]]]:
    """Every arm's server that can start: ``(addresses, skipped)``."""
    skipped: dict[str, str] = {}
    schema = f"tokenwire_bench_{uuid.uuid4().hex[:12]}"
    async with contextlib.AsyncExitStack() as stack:
        stores: dict[str, ConversationStore] = {
            "none": NullStore(),
            "sqlite": SQLiteConversationStore(f"{data_dir}/conversations.db"),
        }
        try:
            store = await _postgres_store(settings.postgres_dsn, schema)
            await store.open()
            await store.close()
            stores["postgres"] = await _postgres_store(settings.postgres_dsn, schema)
            stack.push_async_callback(_drop_schema, settings.postgres_dsn, schema)
        except Exception as exc:  # unreachable, or no driver: the arm is skipped, and said so
            skipped["postgres"] = f"{type(exc).__name__}: {exc}"
        addresses = {}
        for name, store in stores.items():
            backend = FakeBackend(
                reply="x" * settings.max_tokens,
                tokens_per_chunk=settings.max_tokens,
                max_running=max(1024, 2 * streams),
            )
            running = await stack.enter_async_context(
                running_server(backend, config_for_tests(), store=store)
            )
            addresses[name] = running.address
        yield addresses, skipped


async def measure_stores(settings: StoreSettings = DEFAULT) -> StoreReport:
    """Every arm at every concurrency, interleaved over ``settings.rounds`` rounds."""
    settings.check()
    started = time.perf_counter()
    streams = max(settings.concurrency)
    rows = [StoreRow(c, settings.turns_for(c)) for c in settings.concurrency]
    with tempfile.TemporaryDirectory(prefix="tokenwire-bench-") as data_dir:
        async with (
            _servers(settings, data_dir, streams) as (addresses, skipped),
            measure.load_client(settings.client_process) as client,
        ):
            await measure.warm_up(
                client,
                [
                    LoadJob(a, streams, 2, settings.max_tokens, continue_conversations=True)
                    for a in addresses.values()
                ],
            )
            for row in rows:
                row.arms = {name: measure.ArmResult() for name in addresses}
            await measure.run_rounds(
                client,
                [
                    [
                        (
                            row.arms[name],
                            LoadJob(
                                address,
                                row.clients,
                                row.turns,
                                settings.max_tokens,
                                continue_conversations=True,
                            ),
                        )
                        for name, address in addresses.items()
                    ]
                    for row in rows
                ],
                settings.rounds,
            )
    return StoreReport(settings, rows, skipped, time.perf_counter() - started)


def format_report(report: StoreReport) -> str:
    """One table: per concurrency and arm, turns/s, TTFT and the store's share of it."""
    s = report.settings
    lines = [
        "Conversation store cost: the same server over each store, vs a store that does nothing",
        f"{s.max_tokens} tokens per turn in one chunk; every client continues its own "
        f"conversation; medians of {s.rounds} interleaved rounds; "
        f"{report.elapsed_s:.0f} s in all",
        "",
        f"{'streams':>7} {'store':>9} {'turns/s':>8} {'x none':>7} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'store share':>12} {'us CPU/turn':>12} {'errors':>6}",
    ]
    for row in report.rows:
        for name in _ARMS:
            arm = row.arms.get(name)
            if arm is None:
                continue
            turns = sum(r.completed_turns for r in arm.runs)
            cpu_per_turn = sum(arm.cpu_s) / turns * 1e6 if turns else math.nan
            share = "-" if name == "none" else measure.format_pct(row.ttft_share(name))
            lines.append(
                f"{row.clients:>7} {name:>9} {arm.turns_per_s:>8.0f} "
                f"{measure.format_ratio(row.turns_ratio(name)):>7} {arm.ttft_p50_ms:>9.2f} "
                f"{arm.ttft_p99_ms:>9.2f} {share:>12} {cpu_per_turn:>12.0f} "
                f"{arm.failed_turns:>6}"
            )
    lines += [
        "",
        "x none: the arm's turns/s over the null store's. store share: (TTFT - none's) / TTFT.",
        "us CPU/turn: this process's CPU time per completed turn (PostgreSQL's own is not in it).",
    ]
    for name, why in report.skipped.items():
        lines.append(f"{name}: skipped ({why})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.conversation_store``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.conversation_store", description=__doc__.splitlines()[0]
    )
    measure.add_run_options(p, quick="a short run (about 20 s on 2 cores)")
    p.add_argument("--postgres-dsn", help=f"PostgreSQL to measure (default {_DEFAULT_DSN})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the report; exit 1 if any turn failed."""
    args = build_parser().parse_args(argv)
    settings = measure.settings_from_args(args, DEFAULT, QUICK, postgres_dsn=args.postgres_dsn)
    # Errors only: the servers run with authentication off, and say so at every start.
    configure_logging(LoggingConfig(level="error"))
    report = asyncio.run(measure_stores(settings))
    print(json.dumps(report.summary(), indent=2) if args.json else format_report(report))
    if report.failed_turns:
        print(f"{report.failed_turns} turns failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
