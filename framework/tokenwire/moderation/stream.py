"""Output moderation: screen an answer as it streams, so flagged text never reaches the client.

An :class:`ModerationFilter` is the turn's ``OutputFilter``. Text goes through
one *screen* per moderator, in order; a screen holds text back until it has
checked it and releases only text that can no longer become part of a flagged
span. What a filter releases is what the turn runner sends and stores, so once a
screen flags, nothing more is released and the client's text equals the stored one.

- :class:`~tokenwire.moderation.rules.RuleModerator` screens incrementally: it
  holds back only a tail that could still grow into a term (usually part of the
  last word), or its ``pattern_window`` when it has regex patterns. Cost: a few
  microseconds per delta, and almost no added latency.
- Any other moderator (the embedding one) sees whole pieces: text is held until
  a sentence ends (or ``check_chars`` characters are held), then checked as one
  piece. Cost: the client sees each sentence only once it is complete and checked
  - a sentence's generation time plus one check (about 10-40 ms on a CPU for the
  embedding model) of extra latency per sentence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

from tokenwire.moderation.base import CLEAN, Moderator, Verdict, moderator_name
from tokenwire.moderation.rules import RuleModerator, RuleStream
from tokenwire.turns.policy import FilterResult

__all__ = ["ModerationFilter", "Report", "output_filter"]

Report = Callable[[str, Verdict, str], None]
"""Told of each check: ``(moderator name, verdict, the text checked)``."""

# A sentence ends at terminal punctuation (and closing quotes) followed by
# whitespace, or at a line break. "3.14" and "e.g." mid-sentence do not end one.
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*\s+|\n+")


class _Screen(Protocol):
    async def feed(self, text: str) -> tuple[str, Verdict]: ...

    async def finish(self) -> tuple[str, Verdict]: ...


_HELD = FilterResult("")  # nothing to send yet; shared, as most feeds of a held word return it


def _ignore(name: str, verdict: Verdict, text: str) -> None:
    return None


class _RuleScreen:
    """Incremental term matching; see :class:`~tokenwire.moderation.rules.RuleStream`."""

    def __init__(self, rules: RuleModerator, report: Report, *, report_passed: bool) -> None:
        self._stream: RuleStream = rules.stream()
        self._name = moderator_name(rules)
        self._report = report
        self._report_passed = report_passed

    async def feed(self, text: str) -> tuple[str, Verdict]:
        return self.feed_now(text)

    def feed_now(self, text: str) -> tuple[str, Verdict]:
        """:meth:`feed`, synchronously (the rules never wait)."""
        stream = self._stream
        if self._report_passed:
            checked = stream.held + text
            released, verdict = stream.feed(text)
            self._report(self._name, verdict, checked)
            return released, verdict
        released, verdict = stream.feed(text)
        if verdict.flagged:  # a flagged feed releases nothing, so it holds all it checked
            self._report(self._name, verdict, stream.held)
        return released, verdict

    async def finish(self) -> tuple[str, Verdict]:
        checked = self._stream.held
        released, verdict = self._stream.finish()
        if checked and (self._report_passed or verdict.flagged):
            self._report(self._name, verdict, checked)
        return released, verdict


class _PieceScreen:
    """Holds text until a sentence ends (or ``check_chars`` are held), then checks it whole."""

    def __init__(
        self, moderator: Moderator, check_chars: int, report: Report, *, report_passed: bool
    ) -> None:
        self._moderator = moderator
        self._name = moderator_name(moderator)
        self._check_chars = check_chars
        self._report = report
        self._report_passed = report_passed
        self._held = ""

    async def feed(self, text: str) -> tuple[str, Verdict]:
        self._held += text
        cut = self._cut()
        if not cut:
            return "", CLEAN
        piece, self._held = self._held[:cut], self._held[cut:]
        return await self._check(piece)

    async def finish(self) -> tuple[str, Verdict]:
        piece, self._held = self._held, ""
        return await self._check(piece)

    async def _check(self, piece: str) -> tuple[str, Verdict]:
        if not piece.strip():
            return piece, CLEAN
        verdict = await self._moderator.check(piece)
        if self._report_passed or verdict.flagged:
            self._report(self._name, verdict, piece)
        return ("", verdict) if verdict.flagged else (piece, verdict)

    def _cut(self) -> int:
        """How much of the held text is ready to check: through the last sentence end."""
        held = self._held
        cut = 0
        for match in _SENTENCE_END.finditer(held):
            cut = match.end()
        if cut or len(held) < self._check_chars:
            return cut
        space = held.rfind(" ", 0, self._check_chars)  # no sentence end: cut between words
        return space + 1 if space > 0 else self._check_chars


class ModerationFilter:
    """The ``OutputFilter`` of one answer: text passes every screen in order."""

    def __init__(self, screens: Sequence[_Screen]) -> None:
        self._screens = tuple(screens)
        self._flagged: str | None = None
        # With the rules alone (the usual set-up) a feed never waits.
        self._rules = (
            self._screens[0]
            if len(self._screens) == 1 and isinstance(self._screens[0], _RuleScreen)
            else None
        )

    @property
    def synchronous(self) -> bool:
        """Whether :meth:`feed_now` may stand in for :meth:`feed` (rules alone never wait)."""
        return self._rules is not None

    def feed_now(self, text: str) -> FilterResult:
        """:meth:`feed` without waiting; only when :attr:`synchronous`."""
        if self._flagged is not None:
            return FilterResult("", self._flagged)
        assert self._rules is not None
        if text:
            text, verdict = self._rules.feed_now(text)
            if verdict.flagged:
                return self._flag(verdict)
        return FilterResult(text) if text else _HELD

    async def feed(self, text: str) -> FilterResult:
        if self._rules is not None or self._flagged is not None:
            return self.feed_now(text)
        for screen in self._screens:
            if not text:
                break
            text, verdict = await screen.feed(text)
            if verdict.flagged:
                return self._flag(verdict)
        return FilterResult(text) if text else _HELD

    async def flush(self) -> FilterResult:
        if self._flagged is not None:
            return FilterResult("", self._flagged)
        text = ""
        for screen in self._screens:
            released, verdict = await screen.feed(text) if text else ("", CLEAN)
            if verdict.flagged:
                return self._flag(verdict)
            rest, verdict = await screen.finish()
            if verdict.flagged:
                return self._flag(verdict)
            text = released + rest
        return FilterResult(text)

    def _flag(self, verdict: Verdict) -> FilterResult:
        self._flagged = verdict.category or "unspecified"
        return FilterResult("", self._flagged)


def output_filter(
    moderators: Sequence[Moderator],
    *,
    check_chars: int = 400,
    report: Report | None = None,
    report_passed: bool = True,
) -> ModerationFilter:
    """A fresh filter for one answer, screening with ``moderators`` in order.

    ``report`` hears every check, or only flagged ones without ``report_passed``.

    screen = output_filter([RuleModerator()])
    shown = (await screen.feed("Hello, wor")).text + (await screen.flush()).text
    """
    report = report or _ignore
    screens: list[_Screen] = [
        _RuleScreen(m, report, report_passed=report_passed)
        if isinstance(m, RuleModerator)
        else _PieceScreen(m, check_chars, report, report_passed=report_passed)
        for m in moderators
    ]
    return ModerationFilter(screens)
