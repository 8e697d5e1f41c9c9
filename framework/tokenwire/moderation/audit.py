"""The moderation audit log: one structured record per decision, never the text itself.

Records go to the structlog logger ``tokenwire.audit``; flagged decisions at
warning level, passed checks (only with ``audit_all_checks``) at info:

    moderation flagged  direction=output category=violence score=1.0 moderator=rules
                        tenant=acme user=alice turn_id=turn_... text_sha256=9f86d0... text_chars=212

The SHA-256 lets an operator match a record to text they hold (a stored
conversation) without the log ever carrying user content or secrets.
"""

from __future__ import annotations

import hashlib

from tokenwire.context import ANONYMOUS, Principal
from tokenwire.logs import get_logger
from tokenwire.moderation.base import Verdict

__all__ = ["AUDIT_LOGGER", "ModerationAudit"]

AUDIT_LOGGER = "tokenwire.audit"


class ModerationAudit:
    """Writes audit records; ``enabled`` covers flagged decisions, ``all_checks`` passes too."""

    def __init__(self, *, enabled: bool = True, all_checks: bool = False) -> None:
        self.enabled = enabled
        self.all_checks = enabled and all_checks

    def record(
        self,
        *,
        direction: str,
        verdict: Verdict,
        moderator: str,
        text: str,
        principal: Principal = ANONYMOUS,
        turn_id: str = "",
    ) -> None:
        """Log one decision about ``text`` (hashed); ``direction`` is "input" or "output"."""
        if not (self.all_checks or (self.enabled and verdict.flagged)):
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
            "tenant": principal.tenant,
            "user": principal.user,
            "turn_id": turn_id,
            "text_sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
            "text_chars": len(text),
        }
        if verdict.flagged:
            log.warning("moderation flagged", **fields)
        else:
            log.info("moderation passed", **fields)
