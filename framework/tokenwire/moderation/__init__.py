"""Moderation: moderators, the streaming output filter, the audit log, and their settings.

:class:`RuleModerator` checks categories of terms and patterns, tolerant of case
and obfuscation, in microseconds.

    moderator = RuleModerator({"violence": {"terms": ["i will kill you"]}})
    verdict = await moderator.check("I w1ll k.i.l.l you")   # Verdict(True, "violence", 1.0)
"""

from __future__ import annotations

from tokenwire.moderation.base import CLEAN, Moderator, Verdict, moderator_name
from tokenwire.moderation.config import MODERATORS, ModerationConfig
from tokenwire.moderation.rules import DEFAULT_RULES, RuleModerator, Rules, RuleStream, load_rules

__all__ = [
    "CLEAN",
    "DEFAULT_RULES",
    "MODERATORS",
    "ModerationConfig",
    "Moderator",
    "RuleModerator",
    "RuleStream",
    "Rules",
    "Verdict",
    "load_rules",
    "moderator_name",
]
