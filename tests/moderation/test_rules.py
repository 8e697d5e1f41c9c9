"""RuleModerator: obfuscation-tolerant terms and patterns, whole words only, fast."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tokenwire.errors import ConfigError
from tokenwire.moderation import DEFAULT_RULES, RuleModerator, Verdict, load_rules
from tokenwire.moderation.rules import fold

RULES = {"violence": {"terms": ["kill", "i will hurt you"]}, "slur": {"terms": ["cunt"]}}


@pytest.fixture(scope="module")
def rules() -> RuleModerator:
    """A small rule set: one word, one phrase, and the word Scunthorpe contains."""
    return RuleModerator(RULES)


CAUGHT = {
    "plain": "kill",
    "upper case": "KILL",
    "mixed case in a sentence": "They want to KiLl everyone.",
    "leetspeak": "k1ll",
    "leetspeak both letters": "ki11",
    "symbol leetspeak": "k!|l",
    "dotted": "k.i.l.l",
    "spaced": "k i l l",
    "dashes and spaces": "k - i - l - l",
    "repeated letters": "kiiill",
    "many repeated letters": "kkkiiiiiiiiilllllll",
    "zero-width space": "ki\u200bll",
    "zero-width joiner and soft hyphen": "k\u200di\u00adll",
    "Cyrillic look-alikes": "\u043a\u0456ll",
    "Greek look-alikes": "\u039a\u0399LL",
    "full-width letters": "\uff2b\uff29\uff2c\uff2c",
    "accents": "k\u00edll",
    "combining accent": "ki\u0301ll",
    "phrase with leetspeak": "1 w1ll hurt y0u",
    "phrase joined": "iwillhurtyou",
    "phrase with odd spacing": "I   will\n\nhurt   you",
    "phrase spelled out": "I w-i-l-l h.u.r.t you",
    "punctuation around": "(kill)",
    "end of a sentence": "I will not say it. kill!",
}

INNOCENT = {
    "skill": "That takes real skill.",
    "skills in a list": "skills, skillet, killer whales, kiln",
    "Scunthorpe": "Scunthorpe United won on Saturday.",
    "prefix of the term": "kil",
    "letters spread over words": "look ill",
    "phrase cut short": "i will hurt",
    "clean text": "The quick brown fox jumps over the lazy dog.",
    "numbers": "Call 555-0199 at 7:30, room 411.",
}


@pytest.mark.parametrize("text", CAUGHT.values(), ids=CAUGHT.keys())
async def test_obfuscated_terms_are_caught(rules: RuleModerator, text: str) -> None:
    """Case, leetspeak, look-alikes, separators, repeats and invisible characters still match."""
    assert (await rules.check(text)).flagged


@pytest.mark.parametrize("text", INNOCENT.values(), ids=INNOCENT.keys())
async def test_innocent_look_alikes_pass(rules: RuleModerator, text: str) -> None:
    """Words that merely contain a term, or spread its letters over words, do not match."""
    assert Verdict(False, "", 0.0) == await rules.check(text)


async def test_verdict_names_the_category(rules: RuleModerator) -> None:
    """A match reports its category with score 1."""
    assert Verdict(True, "slur", 1.0) == await rules.check("what a CUNT")
    assert Verdict(True, "violence", 1.0) == await rules.check("I will hurt you")


def test_fold_builds_the_skeleton() -> None:
    """The skeleton is casefolded, without accents or invisible characters, runs cut to three."""
    assert "kill   y0u" == fold("K\u200bI\u0301LL     Y0U")
    assert "$iiip" == fold("$IIIIIIIP")
    assert "k1ll 2024" == fold("k1ll_2024")  # leetspeak is left to the terms: digits stay


DEFAULT_FLAGGED = {
    "I w1ll k1ll y0u": "violence",
    "you should KILL YOURSELF": "self_harm",
    "here is how to make a b0mb": "weapons",
    "c.h.i.l.d p.o.r.n": "sexual_minors",
}

DEFAULT_CLEAN = [
    "How do I kill a process in Linux?",
    "The comedian killed it; that joke was the bomb.",
    "Use a bath bomb for a relaxing evening.",
    "You will kill it at the interview!",
    "Here is how to make a bath bomb.",
]


@pytest.mark.parametrize("text", DEFAULT_FLAGGED, ids=DEFAULT_FLAGGED.values())
def test_default_rules_flag_clear_abuse(text: str) -> None:
    """The built-in rules flag unambiguous phrases in their category."""
    assert DEFAULT_FLAGGED[text] == RuleModerator().check_now(text).category


@pytest.mark.parametrize("text", DEFAULT_CLEAN)
def test_default_rules_leave_everyday_text_alone(text: str) -> None:
    """The built-in rules are phrases, so ordinary uses of their words pass."""
    assert not RuleModerator().check_now(text).flagged


def test_default_rules_cover_their_categories() -> None:
    """Every built-in category has terms."""
    assert all(spec["terms"] for spec in DEFAULT_RULES.values())


def test_patterns_match_the_skeleton() -> None:
    """A regex pattern sees the folded text, so it is obfuscation-tolerant too."""
    moderator = RuleModerator({"pii": {"patterns": [r"\bssn +\d{3} \d{2} \d{4}\b"]}})
    assert "pii" == moderator.check_now("my SSN: 123-45-6789").category
    assert not moderator.check_now("my SSN is secret").flagged


def test_rules_file_is_read(tmp_path: Path) -> None:
    """A TOML rules file gives categories of terms and patterns."""
    path = tmp_path / "rules.toml"
    path.write_text("[categories.spam]\nterms = [\"buy now\"]\npatterns = ['\\bfree money\\b']\n")
    assert {"spam": {"terms": ["buy now"], "patterns": [r"\bfree money\b"]}} == load_rules(path)
    moderator = RuleModerator.from_file(path)
    assert "spam" == moderator.check_now("B U Y  N O W").category
    assert "spam" == moderator.check_now("free money!").category


@pytest.mark.parametrize(
    "text",
    [
        "[categories.x]\nterms = [1]\n",
        "[categories.x]\nwords = ['a']\n",
        "[other]\nterms = ['a']\n",
        "[categories.x]\npatterns = ['(']\n",
        "[categories.x]\nterms = ['...']\n",
        "not toml [",
    ],
)
def test_bad_rules_files_are_config_errors(tmp_path: Path, text: str) -> None:
    """A malformed rules file fails at start-up with a ConfigError naming the problem."""
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        RuleModerator.from_file(path)


def test_missing_rules_file_is_a_config_error(tmp_path: Path) -> None:
    """A rules file that does not exist is a ConfigError with its path."""
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        RuleModerator.from_file(tmp_path / "nope.toml")


# --- streaming -------------------------------------------------------------------------

FRAGMENTS = [
    "the ", "skill ", "look ", "ill ", "kil", "k", "i", "l", " ", ". ", "\n", "Sc", "unthorpe ",
    "1 ", "will ", "hurt ", "y", "ou", "k\u200b", "!", "ll", "...", "\u043a",
]  # fmt: skip
BAD = ["kill", "K.I.L.L", "k1ll", "kiiiill", "k i l l", "1 w1ll hurt y0u", "\u043a\u0456ll"]


def _stream(moderator: RuleModerator, text: str, rng: random.Random) -> tuple[str, Verdict]:
    """Feed ``text`` in random pieces; return everything released and the final verdict."""
    stream, released, at = moderator.stream(), "", 0
    while at < len(text):
        size = rng.randint(1, 6)
        out, verdict = stream.feed(text[at : at + size])
        released += out
        at += size
        if verdict.flagged:
            return released, verdict
    out, verdict = stream.finish()
    return released + out, verdict


def test_stream_agrees_with_check_and_never_releases_a_match(rules: RuleModerator) -> None:
    """Random texts in random pieces: same verdict as one check; nothing of a match escapes."""
    rng = random.Random(7)
    for _ in range(600):
        parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))]
        bad_at = None
        if rng.random() < 0.5:
            cut = rng.randint(0, len(parts))
            bad_at = len("".join(parts[:cut])) + 1
            parts.insert(cut, " " + rng.choice(BAD) + " ")
        text = "".join(parts)
        released, verdict = _stream(rules, text, rng)
        expected = rules.check_now(text)
        assert expected.flagged == verdict.flagged, text
        assert text.startswith(released), text
        if not expected.flagged:
            assert text == released
        else:
            assert not rules.check_now(released).flagged, (text, released)
            if bad_at is not None:
                assert len(released) <= bad_at, (text, released)


def test_stream_holds_back_only_a_possible_term() -> None:
    """Clean text flows at once; only a tail that may still become a term is held."""
    stream = RuleModerator(RULES).stream()
    assert ("Hello ", Verdict(False)) == stream.feed("Hello ")
    assert ("", Verdict(False)) == stream.feed("k")
    assert ("", Verdict(False)) == stream.feed("il")
    assert ("kiln ", Verdict(False)) == stream.feed("n ")
    assert ("", Verdict(True, "violence", 1.0)) == stream.feed("k.i.l.l.")
    assert "k.i.l.l." == stream.held


def test_stream_waits_for_the_word_to_end() -> None:
    """A term at the very end of what arrived so far may still grow ("kill" → "killer")."""
    stream = RuleModerator(RULES).stream()
    assert ("", Verdict(False)) == stream.feed("kill")
    assert ("killer ", Verdict(False)) == stream.feed("er ")
    assert ("", Verdict(False)) == stream.feed("kill")
    assert ("", Verdict(True, "violence", 1.0)) == stream.finish()


def test_stream_with_patterns_holds_the_pattern_window() -> None:
    """With regex patterns, the last ``pattern_window`` skeleton characters wait."""
    moderator = RuleModerator({"pii": {"patterns": [r"\d{4} \d{4}"]}}, pattern_window=10)
    stream = moderator.stream()
    released, verdict = stream.feed("card number is 1234")
    assert ("card numb", False) == (released, verdict.flagged)
    released, verdict = stream.feed(" 5678 and more")
    assert ("", True) == (released, verdict.flagged)


def test_rule_check_costs_microseconds() -> None:
    """Checking a 200-character window with the built-in rules takes well under a millisecond."""
    import time

    moderator = RuleModerator()
    text = (
        "The engineer explains how to restart a stuck process on Linux, then writes "
        "a short poem about autumn leaves falling on the quiet streets of an old town. "
    ) * 2
    text = text[:200]
    moderator.check_now(text)
    start = time.perf_counter()
    for _ in range(200):
        moderator.check_now(text)
    per_check = (time.perf_counter() - start) / 200
    assert per_check < 1e-3
