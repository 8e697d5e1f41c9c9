"""History that fits: trimmed oldest-first to the context minus the answer's room."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tokenwire.backend import ChatMessage
from tokenwire.config import LimitsConfig
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import FakeBackend, config_for_tests, running_server
from tokenwire.turns.history import fit_history


@dataclasses.dataclass
class _CharModel:
    """Counts one token per character of content."""

    context_length: int
    counted: int = 0

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        self.counted += 1
        return sum(len(m.content) for m in messages)


def _history(turns: int) -> list[ChatMessage]:
    out = []
    for i in range(turns):
        out += [ChatMessage("user", f"q{i:03d}"), ChatMessage("assistant", f"a{i:03d}")]
    return out


def test_everything_that_fits_is_kept_with_one_count() -> None:
    """A history that fits whole is kept whole, counted once."""
    model = _CharModel(context_length=1000)
    system, user = [ChatMessage("system", "be brief")], ChatMessage("user", "now")
    kept = fit_history(model, system, _history(5), user, reserve=100)  # type: ignore[arg-type]
    assert [*system, *_history(5), user] == kept
    assert 1 == model.counted


def test_the_oldest_exchanges_go_first_and_the_system_prompt_stays() -> None:
    """50 exchanges of 8 characters, room for 10 of them: the newest 10 stay, the
    system prompt stays, and the kept history starts with a user message."""
    model = _CharModel(context_length=100 + 8 * 10 + 3 + 8)
    system, user = [ChatMessage("system", "be brief")], ChatMessage("user", "now")
    kept = fit_history(model, system, _history(50), user, reserve=100)  # type: ignore[arg-type]
    assert [*system, *_history(50)[-20:], user] == kept
    assert model.counted <= 8  # a binary search, not one count per exchange


def test_a_history_that_cannot_fit_is_dropped_whole() -> None:
    """When only the new message fits, no history is kept."""
    model = _CharModel(context_length=10)
    user = ChatMessage("user", "hi")
    assert [user] == fit_history(model, [], _history(3), user, reserve=5)  # type: ignore[arg-type]


async def test_a_long_conversation_keeps_answering_within_the_context() -> None:
    """Twenty turns on a 512-token model: every turn answers, and each prompt plus its
    max_tokens fits the context (the byte tokenizer counts one token per byte)."""
    backend = FakeBackend(reply="x" * 40, context_length=512)
    limits = dataclasses.replace(LimitsConfig(), max_history_messages=1000)
    async with running_server(backend, config_for_tests(limits=limits)) as running:
        conversation_id = ""
        for i in range(20):
            request = chat_pb2.CompleteRequest(
                message=f"question number {i} " + "y" * 20,
                conversation_id=conversation_id,
                params=chat_pb2.SamplingParams(max_tokens=64),
            )
            events = [e async for e in running.chat.Complete(request)]
            conversation_id = events[0].started.conversation_id
            usage = events[-1].finished.usage
            assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason
            assert usage.prompt_tokens + 64 <= 512
        assert usage.prompt_tokens > 512 // 2  # history was kept, not just the last message
