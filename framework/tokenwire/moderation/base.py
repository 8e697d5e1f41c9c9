"""The moderator contract: one async ``check`` that says whether text is flagged, and why.

    class ShoutModerator:
        name = "shout"

        async def check(self, text: str) -> Verdict:
            if text.isupper():
                return Verdict(flagged=True, category="shouting", score=1.0)
            return CLEAN

A moderator may also define ``async start()`` (load a model) and ``async close()``
(release it); the moderation interceptor calls them when the server starts and stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["CLEAN", "UNCHECKED", "Moderator", "Verdict", "moderator_name"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one check: flagged or not, the category, and how sure (0..1)."""

    flagged: bool
    category: str = ""
    score: float = 0.0


CLEAN = Verdict(flagged=False)

UNCHECKED = "guard_unavailable"
"""The category of a pass given because the check could not run (a guard failing open):
audited like a flag, so an operator sees what went unchecked."""


@runtime_checkable
class Moderator(Protocol):
    """Decides whether a piece of text breaks policy; see the module docstring."""

    async def check(self, text: str) -> Verdict:
        """Check ``text``; never raises for content, only for a broken moderator."""
        ...


def moderator_name(moderator: Moderator) -> str:
    """The name audit records use: the moderator's ``name`` attribute, else its class name."""
    name = getattr(moderator, "name", None)
    return name if isinstance(name, str) and name else type(moderator).__name__
