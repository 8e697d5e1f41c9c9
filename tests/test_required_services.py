"""Redis and PostgreSQL: tests that need them skip locally and fail when services are required."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_SERVICES, postgres_address, require_service

ROOT = Path(__file__).resolve().parent.parent


def test_an_unusable_service_skips_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the requirement, a missing service skips the test and says how to make it fail."""
    monkeypatch.delenv(REQUIRE_SERVICES, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"Redis at redis://x is unreachable \(down\)"):
        require_service("Redis", "redis://x", "down")


def test_an_unusable_service_fails_when_services_are_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With TOKENWIRE_TEST_REQUIRE_SERVICES set, a missing service fails the test."""
    monkeypatch.setenv(REQUIRE_SERVICES, "1")
    with pytest.raises(pytest.fail.Exception, match="must answer"):
        require_service("PostgreSQL", "postgresql://x", "down")


def test_a_usable_service_neither_skips_nor_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """No problem, no outcome: the test goes on."""
    monkeypatch.setenv(REQUIRE_SERVICES, "1")
    require_service("Redis", "redis://x", None)


@pytest.mark.parametrize(
    ("dsn", "address"),
    [
        ("postgresql://127.0.0.1:5432/test", ("127.0.0.1", 5432)),
        ("postgresql://user:secret@db.internal:6543/test", ("db.internal", 6543)),
        ("postgresql:///test", ("127.0.0.1", 5432)),
        ("host=db.internal port=6543 dbname=test", ("db.internal", 6543)),
        ("dbname=test", ("127.0.0.1", 5432)),
    ],
)
def test_postgres_address_reads_urls_and_key_value_dsns(dsn: str, address: tuple[str, int]) -> None:
    """The host and port come from a URL or a libpq key=value DSN, 127.0.0.1:5432 by default."""
    assert address == postgres_address(dsn)


def test_a_required_run_stops_before_collecting_when_services_are_down() -> None:
    """With the requirement set and nothing listening, pytest exits 4 naming both services."""
    env = {
        **os.environ,
        REQUIRE_SERVICES: "1",
        "TOKENWIRE_TEST_REDIS_URL": "redis://127.0.0.1:1/0",
        "TOKENWIRE_TEST_POSTGRES_DSN": "postgresql://127.0.0.1:1/test",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_limits.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = run.stdout + run.stderr
    assert pytest.ExitCode.USAGE_ERROR == run.returncode, output
    assert "Redis at redis://127.0.0.1:1/0" in output
    assert "PostgreSQL at postgresql://127.0.0.1:1/test" in output
    assert "passed" not in output
