"""Moderators combined by policy: ``any``, ``all``, or ``escalate`` (cheap first, then sure).

``any`` is the plain list the moderation policy runs (every moderator checks,
the first flag wins); it needs no wrapper. The other two make one moderator of
several, which the output filter then runs sentence by sentence:

- ``all``: flagged only when every moderator flags (fewer false positives, at the
  cost of recall); the category and score come from the first.
- ``escalate``: each moderator in order decides when it is sure and passes the
  text on when it is not. A verdict is sure when it flags, or when its score is
  below ``unsure_from`` (a clean verdict with a score in ``[unsure_from, 1)`` is
  unsure). The last moderator always decides. So a classifier in front of a
  guard model answers most turns in milliseconds and the guard model runs only
  on the unsure ones::

      EscalatingModerator([ClassifierModerator(), guard], unsure_from=0.15)
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenwire.moderation.base import CLEAN, Moderator, Verdict, moderator_name

__all__ = ["COMBINE_MODES", "AllModerator", "EscalatingModerator"]

COMBINE_MODES = ("any", "all", "escalate")


class _Group:
    def __init__(self, moderators: Sequence[Moderator]) -> None:
        if not moderators:
            raise ValueError("a combined moderator needs at least one moderator")
        self.moderators = tuple(moderators)
        # The output filter hands a group whole sentences when any member wants them
        # (a guard model), so a slow member never runs on every few tokens.
        slow = any(getattr(m, "granularity", "window") == "sentence" for m in self.moderators)
        self.granularity = "sentence" if slow else "window"

    async def start(self) -> None:
        """Start each moderator that has a ``start``."""
        for moderator in self.moderators:
            start = getattr(moderator, "start", None)
            if start is not None:
                await start()

    async def close(self) -> None:
        """Close each moderator that has a ``close``, last first."""
        for moderator in reversed(self.moderators):
            close = getattr(moderator, "close", None)
            if close is not None:
                await close()


class AllModerator(_Group):
    """Flags only what every moderator flags; see the module docstring."""

    def __init__(self, moderators: Sequence[Moderator]) -> None:
        super().__init__(moderators)
        self.name = "all(" + ",".join(moderator_name(m) for m in self.moderators) + ")"

    async def check(self, text: str) -> Verdict:
        """The first verdict when all flag, else clean (stops at the first clean one)."""
        first: Verdict | None = None
        for moderator in self.moderators:
            verdict = await moderator.check(text)
            if not verdict.flagged:
                return Verdict(False, "", verdict.score)
            first = first or verdict
        return first or CLEAN


class EscalatingModerator(_Group):
    """Asks the next moderator only when this one is unsure; see the module docstring."""

    def __init__(self, moderators: Sequence[Moderator], *, unsure_from: float = 0.15) -> None:
        super().__init__(moderators)
        if not 0.0 <= unsure_from <= 1.0:
            raise ValueError(f"unsure_from is a score in [0, 1], got {unsure_from}")
        self.unsure_from = unsure_from
        self.name = "escalate(" + ",".join(moderator_name(m) for m in self.moderators) + ")"
        self.escalations = 0  # how many checks went past the first moderator

    async def check(self, text: str) -> Verdict:
        """The first sure verdict, or the last moderator's."""
        last = len(self.moderators) - 1
        for index, moderator in enumerate(self.moderators):
            verdict = await moderator.check(text)
            if verdict.flagged or index == last or verdict.score < self.unsure_from:
                return verdict
            if index == 0:
                self.escalations += 1
        raise AssertionError("unreachable: the last moderator always decides")  # pragma: no cover
