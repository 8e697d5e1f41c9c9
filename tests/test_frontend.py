"""The model frontend: stop strings, context bounds, detokenizing, over the fake engine."""

from __future__ import annotations

import pytest

from tokenwire.backend import ChatMessage, FinishReason
from tokenwire.config import LimitsConfig
from tokenwire.errors import InvalidArgumentError
from tokenwire.frontend import EngineFrontend, StopMatcher, TextDelta, TurnEnd, TurnParams
from tokenwire.testing import FakeBackend


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    shown: list[str] = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        shown.append(text)
        if stopped:
            return shown, True
    shown.append(matcher.flush())
    return shown, False


def test_stop_matcher_holds_back_a_possible_stop_prefix() -> None:
    """Text that could start a stop string is held until it can be decided."""
    matcher = StopMatcher(["</end>"])
    assert ("Hello ", False) == matcher.feed("Hello </")
    assert ("</b> ok", False) == matcher.feed("b> ok")


def test_stop_matcher_cuts_at_a_stop_split_over_pieces() -> None:
    """A stop string spread over several pieces is found; it and what follows are dropped."""
    shown, stopped = feed_all(StopMatcher(["STOP"]), ["one S", "T", "OP two"])
    assert stopped
    assert "one " == "".join(shown)


def test_stop_matcher_picks_the_earliest_stop() -> None:
    """With several stop strings, the text ends at the first one that appears."""
    shown, stopped = feed_all(StopMatcher(["zz", "b"]), ["a b zz"])
    assert stopped
    assert "a " == "".join(shown)


def test_stop_matcher_flushes_held_text_at_the_end() -> None:
    """Held-back text that never became a stop string is shown when the answer ends."""
    shown, stopped = feed_all(StopMatcher(["STOP"]), ["the ST"])
    assert not stopped
    assert "the ST" == "".join(shown)


@pytest.fixture
async def frontend() -> EngineFrontend:
    """A started frontend over a fake engine with a 128-token context."""
    model = EngineFrontend(
        FakeBackend(reply="0123456789", context_length=128),
        LimitsConfig(default_max_tokens=1000),
    )
    await model.start()
    return model


def test_default_max_tokens_is_capped_by_the_context(frontend: EngineFrontend) -> None:
    """max_tokens 0 takes the configured default, capped by the room left in the context."""
    turn = frontend.prepare([ChatMessage("user", "hi")], TurnParams())
    assert 128 - turn.prompt_tokens == turn.max_tokens


def test_max_tokens_that_fills_the_context_exactly_is_allowed(frontend: EngineFrontend) -> None:
    """A max_tokens that uses exactly the room left is accepted; one more is refused."""
    prompt = frontend.prepare([ChatMessage("user", "hi")], TurnParams()).prompt_tokens
    room = 128 - prompt
    assert (
        room
        == frontend.prepare([ChatMessage("user", "hi")], TurnParams(max_tokens=room)).max_tokens
    )
    with pytest.raises(InvalidArgumentError, match=f"only {room} tokens are left"):
        frontend.prepare([ChatMessage("user", "hi")], TurnParams(max_tokens=room + 1))


async def test_stream_counts_every_token_once(frontend: EngineFrontend) -> None:
    """Token counts of the deltas add up to the completion tokens, held-back text included."""
    turn = frontend.prepare([ChatMessage("user", "hi")], TurnParams(stop=("89",)))
    events = [event async for event in frontend.stream(turn, "r1")]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    end = events[-1]
    assert isinstance(end, TurnEnd)
    assert "01234567" == "".join(d.text for d in deltas)
    assert FinishReason.STOP == end.finish_reason
    assert sum(d.token_count for d in deltas) <= end.completion_tokens
