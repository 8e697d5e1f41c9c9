"""``RuleModerator``: categories of terms and regex patterns, tolerant of case and obfuscation.

Text is first folded to a *skeleton*, one character at a time:

- Unicode compatibility folding (NFKD: the mappings of NFKC) and casefolding, with
  accents, enclosing marks and invisible format characters (zero-width spaces and
  joiners, soft hyphens, BOMs) dropped;
- Cyrillic and Greek look-alikes mapped to Latin letters;
- every character but letters, digits and the leetspeak symbols ``! | @ $``
  becomes a space, and any run of one character is cut to three
  (``kiiiiill`` → ``kiiill``).

Leetspeak is resolved by the terms, not the skeleton, so digits stay digits for
patterns: a term's *o* also accepts ``0``, *i* ``1 ! |``, *l* ``1 |``, *e* ``3``,
*a* ``4 @``, *s* ``5 $`` and *t* ``7``.

A term matches as a whole word or phrase (``skill`` and ``Scunthorpe`` do not
contain the words *kill* and *cunt*), with each letter repeatable
(``kiiill``), the letters of a word either together or each apart
(``k i l l``, ``k.i.l.l``), and the words of a phrase apart or joined.
Patterns are regular expressions over the skeleton, for what terms cannot say.

    moderator = RuleModerator({"violence": {"terms": ["i will kill you"]}})
    (await moderator.check("I w1ll K.I.L.L you")).category      # "violence"

Everything is compiled once; a check of a few hundred characters costs
microseconds. :meth:`RuleModerator.stream` screens text that arrives in pieces.
"""

from __future__ import annotations

import itertools
import os
import re
import tomllib
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenwire.errors import ConfigError
from tokenwire.moderation.base import CLEAN, Verdict

__all__ = ["DEFAULT_RULES", "RuleModerator", "RuleStream", "Rules", "fold", "load_rules"]

Rules = Mapping[str, Mapping[str, Sequence[str]]]
"""``{category: {"terms": [...], "patterns": [...]}}``, the shape of a rules file."""

# Conservative on purpose: phrases that are unambiguous in any context, so ordinary
# answers ("how do I kill a process?") pass. Deployments extend this in a rules file.
DEFAULT_RULES: Rules = {
    "violence": {
        "terms": [
            "i will kill you",
            "i am going to kill you",
            "im going to kill you",
            "i will murder you",
            "i will stab you",
            "i will shoot you",
            "i hope you die",
            "you deserve to die",
        ],
    },
    "self_harm": {
        "terms": [
            "kill yourself",
            "you should kill yourself",
            "go hang yourself",
            "how to kill myself",
            "how to commit suicide",
            "best way to commit suicide",
            "painless way to kill myself",
        ],
    },
    "weapons": {
        "terms": [
            "how to make a bomb",
            "how to build a bomb",
            "make a pipe bomb",
            "build a pipe bomb",
            "how to make napalm",
            "how to make sarin",
            "synthesize sarin",
            "how to make ricin",
        ],
    },
    "sexual_minors": {
        "terms": ["child porn", "child pornography", "kiddie porn", "underage porn"],
    },
    "hate": {
        "terms": ["gas the jews", "kill all jews", "kill all muslims", "heil hitler"],
    },
}

_RUN = 3  # longest run of one character kept in the skeleton
_IN_WORD_GAP = " {1,3}"  # between the letters of a spaced-out word
_WORD_GAP = " {0,3}"  # between the words of a phrase ("killyou" counts)
# What a term's character also accepts in the text (leetspeak). Symbols among them
# stay in the skeleton instead of becoming spaces.
_LEET = {
    "a": "a4@", "e": "e3", "i": "i1!|", "l": "l1|", "o": "o0", "s": "s5$", "t": "t7",
    "0": "0o", "1": "1il|!", "3": "3e", "4": "4a@", "5": "5s$", "7": "7t",
    "!": "!i1|", "|": "|il1", "@": "@a4", "$": "$s5",
}  # fmt: skip
_KEEP = frozenset("!|@$")
_CONFUSABLE = {
    # Cyrillic, lower and upper case
    **dict(zip("авеѕіјкмнорстухԁԛԝһӏ", "abesijkmhopctyxdqwhl", strict=True)),
    **dict(zip("АВЕЅІЈКМНОРСТУХҮ", "abesijkmhopctyxy", strict=True)),  # noqa: RUF001
    # Greek, lower and upper case
    **dict(zip("αβγεηικνορτυχωϲ", "abyenikvoptuxwc", strict=True)),
    **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "abezhikmnoptyx", strict=True)),  # noqa: RUF001
    # Latin look-alikes NFKD leaves alone
    "ı": "i",  # noqa: RUF001
    "ȷ": "j",
    "ɑ": "a",  # noqa: RUF001
    "ɡ": "g",  # noqa: RUF001
}
_DROPPED = frozenset(("Mn", "Me", "Cf"))  # accents, enclosing marks, invisible format chars
_MAX_CACHED = 1 << 16
_COLLAPSE = re.compile(r"(.)\1{3,}", re.DOTALL)


def _fold_char(ch: str) -> str:
    out = []
    for c in unicodedata.normalize("NFKD", ch):
        c = _CONFUSABLE.get(c, c)
        for d in unicodedata.normalize("NFKD", c.casefold()):
            if unicodedata.category(d) in _DROPPED:
                continue
            out.append(d if d.isalnum() or d in _KEEP else " ")
    return "".join(out)


class _FoldTable(dict[int, str]):
    """Code point → skeleton text, filled on first use; ``str.translate`` reads it in C."""

    def __missing__(self, code: int) -> str:
        folded = _fold_char(chr(code))
        if len(self) < _MAX_CACHED:  # bounded: a flood of rare code points costs time, not memory
            self[code] = folded
        return folded


_TABLE = _FoldTable()


def fold(text: str) -> str:
    """The skeleton of ``text`` that terms and patterns are matched against."""
    return _COLLAPSE.sub(r"\1\1\1", text.translate(_TABLE))


def _letter(c: str) -> str:
    alternatives = _LEET.get(c)
    return f"[{re.escape(alternatives)}]" if alternatives else re.escape(c)


def _prefixes(atoms: Sequence[str]) -> str:
    """``a1(?:a2(?:a3)?)?``: every non-empty prefix of the atoms' sequence."""
    out = atoms[-1]
    for atom in reversed(atoms[:-1]):
        out = f"{atom}(?:{out})?"
    return out


class _Term:
    """One folded term, as a full regex and as a regex for any unfinished prefix of it.

    Every regex starts with a literal or a character class (the term's first
    letter), so the engine skips the alternatives of a large rule set in C.
    """

    def __init__(self, term: str) -> None:
        words = fold(term).split()
        if not words:
            raise ValueError(f"term {term!r} has no letters or digits")
        parts = [self._word(word) for word in words]
        self.first = parts[0][0]
        self.letters = frozenset(fold(term).replace(" ", ""))
        # Everything after the first letter, for a combined regex keyed on first letters.
        self.full_rest = parts[0][1] + "".join(_WORD_GAP + f + r for f, r, _ in parts[1:])
        first, rest, partial = parts[-1]
        prefix = first + partial
        for first, rest, partial in reversed(parts[:-1]):
            prefix = f"{first}(?:{partial}|{rest}{_WORD_GAP}(?:{prefix})?)"
        # An unfinished phrase: whole words and gaps, then part of the next word or gap.
        self.prefix_rest = prefix[len(self.first) :]

    @staticmethod
    def _word(word: str) -> tuple[str, str, str]:
        """(first letter, the rest of the whole word, the rest of any prefix of the word)."""
        first = _letter(word[0])
        more = f"{first}{{0,{_RUN - 1}}}"  # the first letter's own repeats
        if len(word) == 1:
            return first, more, more
        runs = [(c, len(list(g))) for c, g in itertools.groupby(word)]
        compact = [f"{_letter(c)}{{{n},{_RUN}}}" for c, n in runs[1:]]
        head = f"{first}{{{runs[0][1] - 1},{_RUN - 1}}}"
        spaced = [x for c in word[1:] for x in (_IN_WORD_GAP, f"{_letter(c)}{{1,{_RUN}}}")]
        loose = [f"{_letter(c)}{{1,{_RUN}}}" for c, _ in runs[1:]]
        rest = f"(?:{head}{''.join(compact)}|{more}{''.join(spaced)})"
        alternatives = [_prefixes(atoms) for atoms in (loose, spaced) if atoms]
        partial = f"{more}(?:{'|'.join(alternatives)})?" if alternatives else more
        return first, rest, partial


def load_rules(path: str | os.PathLike[str]) -> Rules:
    """Read a rules file: ``[categories.NAME]`` tables with ``terms`` and ``patterns`` lists.

    [categories.violence]
    terms = ["i will kill you"]
    patterns = ['\\bkill (him|her) now\\b']
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read moderation rules {os.fspath(path)!r}: {exc}") from exc
    categories = data.get("categories")
    if (
        set(data) - {"categories"}
        or not isinstance(categories, dict)
        or not all(isinstance(spec, dict) for spec in categories.values())
    ):
        raise ConfigError(
            f"{os.fspath(path)}: a rules file holds only [categories.NAME] tables, "
            'e.g. [categories.violence] terms = ["i will kill you"]'
        )
    return {
        str(category): {key: _strings(value, category, key) for key, value in spec.items()}
        for category, spec in categories.items()
    }


class RuleModerator:
    """Flags text containing any category's terms or patterns; see the module docstring.

    ``pattern_window`` is how many skeleton characters a stream holds back for the
    patterns (each must match within that many); terms need no fixed window.
    """

    name = "rules"

    def __init__(self, rules: Rules | None = None, *, pattern_window: int = 64) -> None:
        rules = DEFAULT_RULES if rules is None else rules
        self.categories: tuple[str, ...] = tuple(rules)
        self.pattern_window = pattern_window
        by_category: list[list[_Term]] = []
        patterns: list[tuple[str, re.Pattern[str]]] = []
        for category, spec in rules.items():
            if not isinstance(spec, Mapping):
                raise ConfigError(
                    f"moderation rules [{category}]: expected a table of terms and patterns"
                )
            unknown = set(spec) - {"terms", "patterns"}
            if unknown:
                raise ConfigError(
                    f"moderation rules [{category}]: unknown keys {sorted(unknown)}; "
                    "use terms and patterns"
                )
            terms = []
            for raw in _strings(spec.get("terms", ()), category, "terms"):
                try:
                    terms.append(_Term(raw))
                except ValueError as exc:
                    raise ConfigError(f"moderation rules [{category}]: {exc}") from None
            by_category.append(terms)
            for raw in _strings(spec.get("patterns", ()), category, "patterns"):
                try:
                    patterns.append((category, re.compile(raw)))
                except re.error as exc:
                    raise ConfigError(
                        f"moderation rules [{category}]: bad pattern {raw!r}: {exc}"
                    ) from None
        everything = [term for terms in by_category for term in terms]
        self._patterns = tuple(patterns)
        self._full = _compile(everything, "full_rest", r"(?!\w)")
        # While streaming, a term at the very end may still grow ("kill" → "killer").
        self._settled = _compile(everything, "full_rest", r"(?=\W)")
        self._prefix = _compile(everything, "prefix_rest", r"\Z")
        # Which category a match belongs to is asked only once something matched.
        self._by_category = tuple(_compile(terms, "full_rest", "") for terms in by_category)
        # Runs of one character only matter (and are only cut) where a term could use them.
        letters = {c for term in everything for c in term.letters}
        letters |= {a for c in list(letters) for a in _LEET.get(c, "")} | {" "}
        # Terms alone let a stream skip checks that cannot find anything new.
        self._terms_only = not patterns
        self._runs = () if patterns else tuple(c * (_RUN + 1) for c in sorted(letters))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, pattern_window: int = 64) -> RuleModerator:
        """A moderator with the rules of a TOML file (see :func:`load_rules`)."""
        return cls(load_rules(path), pattern_window=pattern_window)

    async def check(self, text: str) -> Verdict:
        """Check ``text`` (no thread: it costs microseconds)."""
        return self.check_now(text)

    def check_now(self, text: str) -> Verdict:
        """:meth:`check`, synchronously."""
        skeleton = text.translate(_TABLE)
        if not self._runs or any(run in skeleton for run in self._runs):
            skeleton = _COLLAPSE.sub(r"\1\1\1", skeleton)
        return self._verdict(skeleton, 0, final=True)

    def stream(self) -> RuleStream:
        """A screen for one answer that arrives in pieces."""
        return RuleStream(self)

    def _category(self, match: re.Match[str]) -> str:
        for category, terms in zip(self.categories, self._by_category, strict=True):
            if terms is not None and terms.match(match.string, match.start()):
                return category
        raise AssertionError("a term matched that no category holds")  # pragma: no cover

    def _verdict(self, skeleton: str, start: int, *, final: bool) -> Verdict:
        """Flagged if a term or pattern matches at or after ``start``; ``final``: text ended."""
        terms = self._full if final else self._settled
        if terms is not None and (match := terms.search(skeleton, start)):
            return Verdict(True, self._category(match), 1.0)
        for category, pattern in self._patterns:
            for match in pattern.finditer(skeleton, start):
                if final or match.end() < len(skeleton):  # else it may still grow or change
                    return Verdict(True, category, 1.0)
        return CLEAN

    def _hold_from(self, skeleton: str, start: int) -> int:
        """The first skeleton index that may still belong to a match once more text comes."""
        hold = len(skeleton)
        if self._prefix is not None and (match := self._prefix.search(skeleton, start)):
            hold = match.start()
        if self._patterns:
            hold = min(hold, len(skeleton) - self.pattern_window)
        return max(hold, start)


class RuleStream:
    """Screens one answer piece by piece, releasing only text no match can still reach.

    ``feed`` returns the text now safe to show and the verdict so far; held-back
    text is the shortest tail that could still be the start of a term (plus, with
    patterns, the last ``pattern_window`` skeleton characters). After a flagged
    verdict nothing more is released.
    """

    def __init__(self, rules: RuleModerator) -> None:
        self._rules = rules
        self._held = ""  # original text not yet released
        # The skeleton of the held text after one character of context (the last
        # released one, or a space at the start) that word boundaries look at.
        self._chars = [" "]
        self._origin = [-1]  # for each skeleton char: index in _held of the char it came from
        self._last = ""  # the last skeleton character, and how many times in a row
        self._run = 0
        self._flagged: Verdict | None = None  # once flagged, nothing more is released

    @property
    def held(self) -> str:
        """Text received but not yet released."""
        return self._held

    def feed(self, text: str) -> tuple[str, Verdict]:
        """Take the next piece; return ``(text safe to release, verdict)``."""
        if self._flagged is not None:
            self._held += text
            return "", self._flagged
        rules = self._rules
        if not self._held and rules._terms_only:
            # Inside a word with nothing held: no term can start here (terms start
            # after a non-word character) and none can end settled (that needs a
            # non-word character after it), so a one-shot check of everything so far
            # gives what the last one gave and all of it is released.
            skeleton = text.translate(_TABLE)
            if skeleton.isalnum() and self._chars[0].isalnum():
                self._skip_word(skeleton)
                return text, CLEAN
        start = len(self._chars)
        self._append(text)
        skeleton = "".join(self._chars)
        # A settled term match needs a non-word character after it: with none
        # appended, any match would have been found by an earlier feed.
        added = skeleton[start:]
        if rules._terms_only and (not added or added.isalnum()):
            verdict = CLEAN
        else:
            verdict = rules._verdict(skeleton, 1, final=False)
            if verdict.flagged:
                self._flagged = verdict
                return "", verdict
        hold = rules._hold_from(skeleton, 1)
        if hold >= len(skeleton):
            released, self._held = self._held, ""
            self._chars, self._origin = [self._chars[-1]], [-1]
            return released, verdict
        # Never split one original character's skeleton (e.g. "ﬁ" → "fi") across the cut.
        first = self._origin[hold]
        while self._origin[hold - 1] == first:
            hold -= 1
        released, self._held = self._held[:first], self._held[first:]
        self._chars = self._chars[hold - 1 :]
        self._origin = [-1, *(o - first for o in self._origin[hold:])]
        return released, verdict

    def finish(self) -> tuple[str, Verdict]:
        """The answer ended: release what is held, or flag it."""
        verdict = self._flagged or self._rules._verdict("".join(self._chars), 1, final=True)
        released = "" if verdict.flagged else self._held
        self._held = ""
        self._chars, self._origin = [self._chars[-1]], [-1]
        return released, verdict

    def _skip_word(self, skeleton: str) -> None:
        """What :meth:`_append` and a full release leave, for a skeleton of word characters."""
        last = skeleton[-1]
        tail = len(skeleton) - len(skeleton.rstrip(last))
        if tail == len(skeleton) and last == self._last:
            tail += self._run
        self._last, self._run = last, min(tail, _RUN)
        self._chars[0] = last

    def _append(self, text: str) -> None:
        table, chars, origin = _TABLE, self._chars, self._origin
        last, run, base = self._last, self._run, len(self._held)
        for i, ch in enumerate(text):
            for c in table[ord(ch)]:
                if c == last:
                    if run >= _RUN:
                        continue
                    run += 1
                else:
                    last, run = c, 1
                chars.append(c)
                origin.append(base + i)
        self._last, self._run = last, run
        self._held += text


def _compile(terms: Sequence[_Term], part: str, end: str) -> re.Pattern[str] | None:
    """One regex for all ``terms``, branching on their first letters, or None for no terms."""
    if not terms:
        return None
    by_first: dict[str, list[str]] = {}
    for term in terms:
        by_first.setdefault(term.first, []).append(getattr(term, part))
    branches = "|".join(f"{first}(?:{'|'.join(rests)})" for first, rests in by_first.items())
    return re.compile(rf"(?<!\w)(?:{branches}){end}")


def _strings(value: object, category: str, key: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"moderation rules [{category}]: {key} must be a list of strings")
    if not all(isinstance(item, str) for item in value):
        raise ConfigError(f"moderation rules [{category}]: {key} must be a list of strings")
    return list(value)
