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
- A fast model-based moderator (the classifier, the embedding one) screens a
  sliding window: text is held until ``window_chars`` characters (a few tokens)
  or a sentence end arrive, then the sentence so far, new text included, is
  checked and the new text released if it passes. Text is never sent before a
  check that covered it passed; the hold-back is a few tokens plus one check
  (about 5-20 ms on a CPU), and under load it widens by itself (text that
  arrives during a check joins the next one).
- A slow moderator (``granularity = "sentence"``: a guard model) sees whole
  pieces: text is held until a sentence ends (or ``check_chars`` characters are
  held), then checked as one piece: a sentence's generation time plus one check.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

from tokenwire.moderation.actions import BLOCK
from tokenwire.moderation.base import CLEAN, Moderator, Verdict, moderator_name
from tokenwire.moderation.rules import RuleModerator, RuleStream
from tokenwire.turns.policy import FilterResult

__all__ = ["Decide", "ModerationFilter", "Report", "output_filter"]

Report = Callable[[str, Verdict, str, str], None]
"""Told of each check: ``(moderator name, verdict, the text checked, action)``; the
action (block, log or allow) is ``""`` for a check that passed."""
Decide = Callable[[Verdict], str]
"""A flagged verdict's action for this turn's principal: block, log or allow."""

# A sentence ends at terminal punctuation (and closing quotes) followed by
# whitespace, or at a line break. "3.14" and "e.g." mid-sentence do not end one.
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*\s+|\n+")


class _Screen(Protocol):
    async def feed(self, text: str) -> tuple[str, Verdict]: ...

    async def finish(self) -> tuple[str, Verdict]: ...


_HELD = FilterResult("")  # nothing to send yet; shared, as most feeds of a held word return it


def _ignore(name: str, verdict: Verdict, text: str, action: str) -> None:
    return None


def _block(verdict: Verdict) -> str:
    return BLOCK


class _RuleScreen:
    """Incremental term matching; see :class:`~tokenwire.moderation.rules.RuleStream`."""

    def __init__(
        self, rules: RuleModerator, report: Report, decide: Decide, *, report_passed: bool
    ) -> None:
        self._rules = rules
        self._stream: RuleStream = rules.stream()
        self._name = moderator_name(rules)
        self._report = report
        self._decide = decide
        self._report_passed = report_passed

    async def feed(self, text: str) -> tuple[str, Verdict]:
        return self.feed_now(text)

    def feed_now(self, text: str) -> tuple[str, Verdict]:
        """:meth:`feed`, synchronously (the rules never wait)."""
        stream = self._stream
        checked = stream.held + text if self._report_passed else ""
        released, verdict = stream.feed(text)
        if verdict.flagged:  # a flagged feed releases nothing, so it holds all it checked
            return self._flagged(verdict, stream.held)
        if self._report_passed:
            self._report(self._name, verdict, checked, "")
        return released, verdict

    async def finish(self) -> tuple[str, Verdict]:
        checked = self._stream.held
        released, verdict = self._stream.finish()
        if verdict.flagged:
            return self._flagged(verdict, checked)
        if checked and self._report_passed:
            self._report(self._name, verdict, checked, "")
        return released, verdict

    def _flagged(self, verdict: Verdict, held: str) -> tuple[str, Verdict]:
        action = self._decide(verdict)
        self._report(self._name, verdict, held, action)
        if action == BLOCK:
            return "", verdict
        # Logged or allowed for this tenant: release what was held and match afresh.
        self._stream = self._rules.stream()
        return held, CLEAN


class _PieceScreen:
    """Holds text until a sentence ends (or ``check_chars`` are held), then checks it whole."""

    def __init__(
        self,
        moderator: Moderator,
        check_chars: int,
        report: Report,
        decide: Decide,
        *,
        report_passed: bool,
    ) -> None:
        self._moderator = moderator
        self._name = moderator_name(moderator)
        self._check_chars = check_chars
        self._report = report
        self._decide = decide
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
        if not verdict.flagged:
            if self._report_passed:
                self._report(self._name, verdict, piece, "")
            return piece, verdict
        action = self._decide(verdict)
        self._report(self._name, verdict, piece, action)
        return ("", verdict) if action == BLOCK else (piece, CLEAN)

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


class _WindowScreen:
    """Checks the sentence so far every ``window_chars`` characters; releases what passed."""

    def __init__(
        self,
        moderator: Moderator,
        window_chars: int,
        context_chars: int,
        report: Report,
        decide: Decide,
        *,
        report_passed: bool,
    ) -> None:
        self._moderator = moderator
        self._name = moderator_name(moderator)
        self._window = window_chars
        self._context_chars = context_chars
        self._report = report
        self._decide = decide
        self._report_passed = report_passed
        self._sentence = ""  # the current sentence's text already released
        self._held = ""

    async def feed(self, text: str) -> tuple[str, Verdict]:
        self._held += text
        if len(self._held) < self._window and not _SENTENCE_END.search(self._held):
            return "", CLEAN
        return await self._check()

    async def finish(self) -> tuple[str, Verdict]:
        return await self._check()

    async def _check(self) -> tuple[str, Verdict]:
        held, self._held = self._held, ""
        if not held.strip():
            self._sentence += held
            return held, CLEAN
        piece = (self._sentence + held)[-self._context_chars :]
        verdict = await self._moderator.check(piece)
        if verdict.flagged:
            action = self._decide(verdict)
            self._report(self._name, verdict, piece, action)
            if action == BLOCK:
                return "", verdict
            verdict = CLEAN
        elif self._report_passed:
            self._report(self._name, verdict, piece, "")
        # The next check starts at the last sentence end, so its context stays one sentence.
        sentence = self._sentence + held
        end = 0
        for match in _SENTENCE_END.finditer(sentence):
            end = match.end()
        self._sentence = sentence[end:]
        return held, verdict


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
    decide: Decide | None = None,
    window_chars: int = 24,
) -> ModerationFilter:
    """A fresh filter for one answer, screening with ``moderators`` in order.

    ``report`` hears every check, or only flagged ones without ``report_passed``.
    ``decide`` gives a flag's action (default: block); a logged or allowed flag is
    reported and its text released. ``window_chars``: how much text a window screen
    holds before it checks (a few tokens).

    screen = output_filter([RuleModerator()])
    shown = (await screen.feed("Hello, wor")).text + (await screen.flush()).text
    """
    report = report or _ignore
    decide = decide or _block
    screens: list[_Screen] = []
    for m in moderators:
        if isinstance(m, RuleModerator):
            screens.append(_RuleScreen(m, report, decide, report_passed=report_passed))
        elif getattr(m, "granularity", "window") == "sentence":
            screens.append(
                _PieceScreen(m, check_chars, report, decide, report_passed=report_passed)
            )
        else:
            screens.append(
                _WindowScreen(
                    m, window_chars, check_chars, report, decide, report_passed=report_passed
                )
            )
    return ModerationFilter(screens)
