"""The model frontend: stop strings, context bounds, detokenizing, over the fake engine."""

from __future__ import annotations

import pytest

from tokenwire.backend import ChatMessage, FinishReason
from tokenwire.config import LimitsConfig
from tokenwire.errors import InvalidArgumentError
from tokenwire.model.frontend import EngineFrontend, StopMatcher, TextDelta, TurnEnd, TurnParams
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


# "<|user|>hi\n<|assistant|>" is 24 bytes: 24 tokens of the byte tokenizer.
HI_PROMPT_TOKENS = 24
ROOM = 128 - HI_PROMPT_TOKENS


def test_prompt_is_the_templated_conversation(frontend: EngineFrontend) -> None:
    """The prompt is the byte tokenizer's template of the messages, one token per byte."""
    turn = frontend.prepare([ChatMessage("user", "hi")], TurnParams())
    assert (list(b"<|user|>hi\n<|assistant|>"), HI_PROMPT_TOKENS) == (
        list(turn.prompt_token_ids),
        turn.prompt_tokens,
    )


def test_default_max_tokens_is_capped_by_the_context(frontend: EngineFrontend) -> None:
    """max_tokens 0 takes the configured default (1000), capped by the 104 tokens left."""
    turn = frontend.prepare([ChatMessage("user", "hi")], TurnParams())
    assert ROOM == turn.max_tokens


def test_max_tokens_that_fills_the_context_exactly_is_allowed(frontend: EngineFrontend) -> None:
    """A max_tokens that uses exactly the room left is accepted; one more is refused."""
    turn = frontend.prepare([ChatMessage("user", "hi")], TurnParams(max_tokens=ROOM))
    assert ROOM == turn.max_tokens
    with pytest.raises(InvalidArgumentError, match=f"only {ROOM} tokens are left"):
        frontend.prepare([ChatMessage("user", "hi")], TurnParams(max_tokens=ROOM + 1))


@pytest.mark.parametrize(
    ("stop", "shown", "delta_tokens"),
    [
        ("89", "01234567", 8),  # the stop string's two tokens are in no Delta
        ("8x", "0123456789", 10),  # "8" held back, then sent with "9"
        ("9x", "0123456789", 10),  # "9" held back to the end, then flushed
    ],
)
async def test_stream_counts_every_token_once(
    frontend: EngineFrontend, stop: str, shown: str, delta_tokens: int
) -> None:
    """Deltas count each token they show once, held-back text included; usage counts all ten."""
    turn = frontend.prepare([ChatMessage("user", "hi")], TurnParams(stop=(stop,)))
    events = [event async for event in frontend.stream(turn, "r1")]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    end = events[-1]
    assert isinstance(end, TurnEnd)
    assert (shown, delta_tokens) == (
        "".join(d.text for d in deltas),
        sum(d.token_count for d in deltas),
    )
    assert (FinishReason.STOP, HI_PROMPT_TOKENS, 10) == (
        end.finish_reason,
        end.prompt_tokens,
        end.completion_tokens,
    )
