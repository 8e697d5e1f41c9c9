"""The moderation audit log: a keyed hash of the text under a private, persistent key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from tokenwire.errors import ConfigError
from tokenwire.moderation import ModerationAudit, Verdict
from tokenwire.moderation.audit import AUDIT_LOGGER, audit_key_path

FLAGGED = Verdict(flagged=True, category="violence", score=1.0)
PASSED = Verdict(flagged=False)


@pytest.fixture
def info_logs() -> Iterator[None]:
    """Let info records through the structlog pipeline (the test session logs warnings)."""
    old = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        yield
    finally:
        structlog.configure(wrapper_class=old)


def _records(audit: ModerationAudit, *checks: tuple[str, Verdict]) -> list[Mapping[str, Any]]:
    """What ``audit`` logs for each (text, verdict) checked."""
    with capture_logs() as logs:
        for text, verdict in checks:
            audit.record(direction="input", verdict=verdict, moderator="rules", text=text)
    return [entry for entry in logs if entry.get("logger_name") == AUDIT_LOGGER]


def test_records_carry_an_hmac_under_the_key_file(tmp_path: Path) -> None:
    """text_hmac is HMAC-SHA256 under the key file's key, not the plain SHA-256 of the text."""
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(b"k" * 32)
    [record] = _records(ModerationAudit(key_file=key_file), ("yes", FLAGGED))
    expected = hmac.new(b"k" * 32, b"yes", hashlib.sha256).hexdigest()
    assert expected == record["text_hmac"]
    assert "text_sha256" not in record
    assert hashlib.sha256(b"yes").hexdigest() not in repr(record)


@pytest.mark.usefixtures("umask_022")
def test_the_key_is_created_private_on_first_use(tmp_path: Path) -> None:
    """A missing key file is made: 32 bytes, mode 0600, in a new 0700 folder."""
    key_file = Path(audit_key_path(tmp_path / "data"))
    ModerationAudit(key_file=key_file)
    assert (tmp_path / "data" / "audit.key", 32) == (key_file, len(key_file.read_bytes()))
    modes = [oct(stat.S_IMODE(p.stat().st_mode)) for p in (key_file.parent, key_file)]
    assert ["0o700", "0o600"] == modes


def test_the_key_persists_across_restarts(tmp_path: Path) -> None:
    """Two audits on one key file hash alike; one on another key file does not."""
    first = ModerationAudit(key_file=tmp_path / "audit.key")
    restarted = ModerationAudit(key_file=tmp_path / "audit.key")
    other_server = ModerationAudit(key_file=tmp_path / "other" / "audit.key")
    assert first.text_hmac("hello") == restarted.text_hmac("hello")
    assert first.text_hmac("hello") != other_server.text_hmac("hello")


def test_without_a_key_file_the_key_lives_in_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key_file: a random key per audit, and no file is written anywhere near."""
    monkeypatch.chdir(tmp_path)
    first, second = ModerationAudit(), ModerationAudit()
    assert first.text_hmac("hello") == first.text_hmac("hello")
    assert first.text_hmac("hello") != second.text_hmac("hello")
    assert [] == list(tmp_path.iterdir())


def test_a_disabled_audit_writes_no_key(tmp_path: Path) -> None:
    """enabled=False leaves the key file uncreated and logs nothing."""
    audit = ModerationAudit(enabled=False, all_checks=True, key_file=tmp_path / "audit.key")
    assert [] == _records(audit, ("hi", FLAGGED), ("hi", PASSED))
    assert not (tmp_path / "audit.key").exists()


@pytest.mark.parametrize("content", [b"", b"short"])
def test_a_short_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    """A key file under 32 bytes is a ConfigError that names the file."""
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(content)
    with pytest.raises(ConfigError, match=r"audit\.key"):
        ModerationAudit(key_file=key_file)


@pytest.mark.usefixtures("info_logs")
def test_by_default_only_flagged_decisions_are_logged() -> None:
    """By default flagged checks are logged, at warning; all_checks adds passed ones, at info."""
    checks = (("bad", FLAGGED), ("fine", PASSED))
    default = _records(ModerationAudit(), *checks)
    every = _records(ModerationAudit(all_checks=True), *checks)
    assert [(True, "warning")] == [(r["flagged"], r["log_level"]) for r in default]
    assert [(True, "warning"), (False, "info")] == [(r["flagged"], r["log_level"]) for r in every]
