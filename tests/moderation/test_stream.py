"""The output filter: text is released only once checked, and never after a flag."""

from __future__ import annotations

from tokenwire.moderation import CLEAN, Moderator, RuleModerator, Verdict, output_filter
from tokenwire.moderation.combine import EscalatingModerator
from tokenwire.turns.policy import FilterResult, OutputFilter


class WordModerator:
    """Flags any text containing ``word``; records every text it checked (a fast model)."""

    name = "word"

    def __init__(self, word: str = "BAD") -> None:
        self.word = word
        self.checked: list[str] = []

    async def check(self, text: str) -> Verdict:
        self.checked.append(text)
        return Verdict(True, "bad", 0.9) if self.word in text else CLEAN


class SentenceWordModerator(WordModerator):
    """A slow model (a guard): it wants whole sentences."""

    granularity = "sentence"


async def run(screen: OutputFilter, pieces: list[str]) -> tuple[list[str], str | None]:
    """Feed pieces, then flush; return the released texts and the flagged category."""
    released = []
    for piece in pieces:
        result = await screen.feed(piece)
        released.append(result.text)
        if result.flagged_category is not None:
            return released, result.flagged_category
    result = await screen.flush()
    released.append(result.text)
    return released, result.flagged_category


async def test_filter_is_an_output_filter_and_a_moderator_fits_the_protocol() -> None:
    """The filter satisfies OutputFilter; both moderators satisfy Moderator."""
    assert isinstance(output_filter([RuleModerator()]), OutputFilter)
    assert isinstance(RuleModerator(), Moderator)
    assert isinstance(WordModerator(), Moderator)


async def test_rule_filter_releases_clean_text_unchanged() -> None:
    """Clean text comes out exactly as it went in."""
    text = "Hello, world! Skills pay the bills.\n"
    released, flagged = await run(output_filter([RuleModerator()]), list(text))
    assert (text, None) == ("".join(released), flagged)


async def test_rule_filter_never_releases_the_flagged_term() -> None:
    """Fed byte-sized pieces, the filter flags before any letter of the term is out."""
    text = "Fine. Then I will kill you, I said."
    released, flagged = await run(output_filter([RuleModerator()]), list(text))
    assert ("Fine. Then ", "violence") == ("".join(released), flagged)


async def test_after_a_flag_nothing_more_is_released() -> None:
    """Once flagged, later feeds and the flush release nothing and repeat the category."""
    screen = output_filter([RuleModerator({"x": {"terms": ["boom"]}})])
    assert FilterResult("", "x") == await screen.feed("boom!")
    assert FilterResult("", "x") == await screen.feed("more text")
    assert FilterResult("", "x") == await screen.flush()


async def test_piece_filter_holds_text_until_a_sentence_ends() -> None:
    """A slow moderator sees whole sentences; text is released only after its check."""
    moderator = SentenceWordModerator()
    screen = output_filter([moderator])
    assert FilterResult("") == await screen.feed("First sentence")
    assert FilterResult("First sentence. ") == await screen.feed(". Sec")
    assert FilterResult("") == await screen.feed("ond one")
    assert FilterResult("Second one") == await screen.flush()
    assert ["First sentence. ", "Second one"] == moderator.checked


async def test_piece_filter_flags_a_sentence_without_releasing_it() -> None:
    """A flagged sentence is withheld; what came before it was released."""
    released, flagged = await run(
        output_filter([SentenceWordModerator()]), list("All good here. This is BAD news. More.")
    )
    assert ("All good here. ", "bad") == ("".join(released), flagged)


async def test_window_filter_releases_a_few_characters_at_a_time() -> None:
    """A fast moderator checks the sentence so far every window; text goes out once checked."""
    moderator = WordModerator()
    screen = output_filter([moderator], window_chars=8)
    assert FilterResult("") == await screen.feed("One two")
    assert FilterResult("One two three") == await screen.feed(" three")
    assert FilterResult("") == await screen.feed(" fo")
    assert FilterResult(" four. ") == await screen.feed("ur. ")
    assert FilterResult("") == await screen.feed("Five")
    assert FilterResult("Five") == await screen.flush()
    # Each check sees its sentence so far, never the sentences before it.
    assert ["One two three", "One two three four. ", "Five"] == moderator.checked


async def test_window_filter_withholds_the_window_that_flags() -> None:
    """The window that completes a flagged phrase is withheld; earlier windows were shown."""
    released, flagged = await run(
        output_filter([WordModerator()], window_chars=6), list("All good here. This is BAD news.")
    )
    shown = "".join(released)
    assert "bad" == flagged
    assert "All good here. This is BAD news.".startswith(shown)
    assert "BAD" not in shown
    assert shown.startswith("All good here. ")


async def test_piece_filter_checks_long_text_without_sentence_ends() -> None:
    """Without a sentence end, text is checked every ``check_chars`` characters, between words."""
    moderator = SentenceWordModerator()
    screen = output_filter([moderator], check_chars=12)
    assert FilterResult("") == await screen.feed("one two")
    assert FilterResult("one two ") == await screen.feed(" three four")
    assert ["one two "] == moderator.checked


async def test_flush_passes_rule_held_text_through_later_moderators() -> None:
    """Text the rules release only at the end is still checked by the next moderator."""
    words = WordModerator("kil")
    screen = output_filter([RuleModerator({"v": {"terms": ["kill"]}}), words])
    assert FilterResult("") == await screen.feed("Nice kil")
    assert FilterResult("", "bad") == await screen.flush()
    assert ["Nice kil"] == words.checked


async def test_every_check_is_reported() -> None:
    """The report callback hears each check: moderator, verdict, text checked, action."""
    reports: list[tuple[str, Verdict, str, str]] = []
    screen = output_filter(
        [RuleModerator({"v": {"terms": ["kill"]}}), WordModerator()],
        report=lambda *args: reports.append(args),
    )
    await screen.feed("Hi. ")
    await screen.feed("kill ")
    assert [
        ("rules", CLEAN, "Hi. ", ""),
        ("word", CLEAN, "Hi. ", ""),
        ("rules", Verdict(True, "v", 1.0), "kill ", "block"),
    ] == reports


def test_a_group_with_a_slow_member_is_screened_by_sentence() -> None:
    """escalate(classifier, guard) gets whole sentences: the guard never runs per window."""
    assert "sentence" == EscalatingModerator([WordModerator(), SentenceWordModerator()]).granularity
    assert "window" == EscalatingModerator([WordModerator(), WordModerator("X")]).granularity
