"""The moderation audit log: one structured record per decision, never the text itself.

Records go to the structlog logger ``tokenwire.audit``. By default only flagged
decisions are logged, at warning level; with ``audit_all_checks`` every check is,
the passed ones at info:

    moderation flagged  direction=output category=violence score=1.0 moderator=rules
                        tenant=acme user=alice turn_id=turn_... text_hmac=9f86d0... text_chars=212

``text_hmac`` is the HMAC-SHA256 of the text under a secret key. Whoever holds
the key can match a record to text they hold (a stored conversation); the log
alone gives nothing away, where a plain hash of a short text ("yes", a name, a
card number) is undone by hashing guesses. The key is a file, ``audit.key`` in
the server's data directory (32 random bytes, mode 0600, created on first use),
so records match across restarts and across gateways that share the directory::

    audit = ModerationAudit(key_file=audit_key_path(config.store.data_dir))
    audit.text_hmac("text from a stored conversation")  # equals the record's text_hmac
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final

from tokenwire.auth.principal import ANONYMOUS, Principal
from tokenwire.errors import ConfigError
from tokenwire.logs import get_logger
from tokenwire.moderation.base import UNCHECKED, Verdict
from tokenwire.private_files import make_private_dirs, write_private_file

__all__ = [
    "AUDIT_KEY_BYTES",
    "AUDIT_KEY_FILE",
    "AUDIT_LOGGER",
    "ModerationAudit",
    "audit_key_path",
    "load_audit_key",
]

AUDIT_LOGGER: Final = "tokenwire.audit"
AUDIT_KEY_FILE: Final = "audit.key"
AUDIT_KEY_BYTES: Final = 32


def audit_key_path(data_dir: str | os.PathLike[str]) -> str:
    """Where the audit key of a server with this data directory lives."""
    return str(Path(data_dir) / AUDIT_KEY_FILE)


def load_audit_key(path: str | os.PathLike[str]) -> bytes:
    """The key in ``path``; if there is none, 32 random bytes written there first (mode 0600).

    Of several processes creating it at once, one key wins and all of them use
    it. A key file shorter than 32 bytes, or unreadable, is a ConfigError.
    """
    target = Path(path)
    try:
        if not target.exists():
            make_private_dirs(target.parent)
            # If another process creates it first, its key is the one read below.
            with contextlib.suppress(FileExistsError):
                write_private_file(target, secrets.token_bytes(AUDIT_KEY_BYTES), replace=False)
        key = target.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read or create the audit key file {target}: {exc}") from exc
    if len(key) < AUDIT_KEY_BYTES:
        raise ConfigError(
            f"the audit key file {target} holds {len(key)} bytes, fewer than "
            f"{AUDIT_KEY_BYTES}; replace it (records made with it will no longer match)"
        )
    return key


class ModerationAudit:
    """Writes audit records; ``enabled`` covers flagged decisions, ``all_checks`` passes too.

    ``key_file`` holds the key of ``text_hmac`` (see :func:`load_audit_key`; a
    server passes :func:`audit_key_path` of its data directory). Without it the key
    is random and lives only as long as this object, so records can be matched to
    text only while the process runs. With ``enabled`` off no key file is touched.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        all_checks: bool = False,
        key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.enabled = enabled
        self.all_checks = enabled and all_checks
        if enabled and key_file is not None:
            self._key = load_audit_key(key_file)
        else:
            self._key = secrets.token_bytes(AUDIT_KEY_BYTES)

    def text_hmac(self, text: str) -> str:
        """The ``text_hmac`` a record about ``text`` carries: hex HMAC-SHA256 under the key."""
        data = text.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def record(
        self,
        *,
        direction: str,
        verdict: Verdict,
        moderator: str,
        text: str,
        principal: Principal = ANONYMOUS,
        turn_id: str = "",
        action: str = "",
    ) -> None:
        """Log one decision about ``text`` (hashed); ``direction`` is "input" or "output".

        ``action`` is what the flag did for this tenant (block, log or allow).
        """
        noteworthy = verdict.flagged or verdict.category == UNCHECKED
        if not (self.all_checks or (self.enabled and noteworthy)):
            return
        # Looked up per record, so a pipeline configured after import (log shipping,
        # structlog.testing.capture_logs) always applies to audit records.
        log = get_logger(AUDIT_LOGGER)
        fields = {
            "direction": direction,
            "flagged": verdict.flagged,
            "category": verdict.category,
            "score": round(verdict.score, 4),
            "moderator": moderator,
            **({"action": action} if action else {}),
            "tenant": principal.tenant,
            "user": principal.user,
            "turn_id": turn_id,
            "text_hmac": self.text_hmac(text),
            "text_chars": len(text),
        }
        if verdict.flagged:
            log.warning("moderation flagged", **fields)
        elif verdict.category == UNCHECKED:
            log.warning("moderation could not check; passed", **fields)
        else:
            log.info("moderation passed", **fields)
