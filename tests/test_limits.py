"""limits.system_prompt and limits.max_history_messages: what reaches the engine, on a real server.

The fake backend speaks bytes, so a prompt is its chat template spelled out:
``<|role|>content\\n`` per message, then ``<|assistant|>``.
"""

from __future__ import annotations

from tokenwire.config import LimitsConfig
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

REPLY = "ok"


async def complete(running: RunningServer, message: str, conversation_id: str = "") -> str:
    """One Complete turn that must finish; returns its conversation id."""
    request = chat_pb2.CompleteRequest(message=message, conversation_id=conversation_id)
    events = [event async for event in running.chat.Complete(request)]
    assert ("started", "finished") == (
        events[0].WhichOneof("event"),
        events[-1].WhichOneof("event"),
    )
    return events[0].started.conversation_id


async def prompts(
    limits: LimitsConfig, *messages: str, new_conversation: bool = False
) -> list[str]:
    """Send ``messages`` as turns of one conversation (or each in a new one); the prompts sent."""
    backend = FakeBackend(reply=REPLY)
    async with running_server(backend, config_for_tests(limits=limits)) as running:
        conversation = ""
        for message in messages:
            conversation = await complete(
                running, message, "" if new_conversation else conversation
            )
    return [bytes(log.request.prompt_token_ids).decode() for log in backend.requests]


async def test_without_a_system_prompt_the_prompt_is_the_user_message() -> None:
    """By default no system message is sent: the prompt is the user's message alone."""
    assert ["<|user|>Hi\n<|assistant|>"] == await prompts(LimitsConfig(), "Hi")


async def test_the_system_prompt_leads_every_turn_once() -> None:
    """The system prompt opens each prompt once, before the history, and is not stored as one."""
    limits = LimitsConfig(system_prompt="Answer in French.")
    assert [
        "<|system|>Answer in French.\n<|user|>Hi\n<|assistant|>",
        "<|system|>Answer in French.\n<|user|>Hi\n<|assistant|>ok\n<|user|>Again\n<|assistant|>",
    ] == await prompts(limits, "Hi", "Again")


async def test_the_system_prompt_opens_every_new_conversation() -> None:
    """Each new conversation gets the system prompt too."""
    limits = LimitsConfig(system_prompt="Be brief.")
    expected = ["<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"] * 2
    assert expected == await prompts(limits, "Hi", "Hi", new_conversation=True)


async def test_usage_counts_the_system_prompt() -> None:
    """The reported prompt tokens are those of the templated prompt, system message included."""
    limits = LimitsConfig(system_prompt="Be brief.")
    async with running_server(FakeBackend(reply=REPLY), config_for_tests(limits=limits)) as r:
        events = [e async for e in r.chat.Complete(chat_pb2.CompleteRequest(message="Hi"))]
    expected = len(b"<|system|>Be brief.\n<|user|>Hi\n<|assistant|>")
    assert (expected, len(REPLY)) == (
        events[-1].finished.usage.prompt_tokens,
        events[-1].finished.usage.completion_tokens,
    )


async def test_history_is_the_whole_conversation_by_default() -> None:
    """Under the default limit (64) every earlier message is sent, oldest first."""
    *_, third = await prompts(LimitsConfig(), "one", "two", "three")
    assert (
        "<|user|>one\n<|assistant|>ok\n<|user|>two\n<|assistant|>ok\n<|user|>three\n<|assistant|>"
        == third
    )


async def test_history_keeps_only_the_newest_messages() -> None:
    """With max_history_messages=2 only the last exchange comes before the new message."""
    *_, third = await prompts(LimitsConfig(max_history_messages=2), "one", "two", "three")
    assert "<|user|>two\n<|assistant|>ok\n<|user|>three\n<|assistant|>" == third


async def test_an_odd_history_limit_never_starts_with_the_assistant() -> None:
    """With max_history_messages=3 the cut drops the orphaned answer: history starts with a user."""
    *_, third = await prompts(LimitsConfig(max_history_messages=3), "one", "two", "three")
    assert "<|user|>two\n<|assistant|>ok\n<|user|>three\n<|assistant|>" == third


async def test_the_system_prompt_is_not_counted_as_history() -> None:
    """The history limit counts stored messages only; the system prompt comes on top."""
    limits = LimitsConfig(max_history_messages=2, system_prompt="Be brief.")
    *_, third = await prompts(limits, "one", "two", "three")
    assert (
        "<|system|>Be brief.\n<|user|>two\n<|assistant|>ok\n<|user|>three\n<|assistant|>" == third
    )


async def test_zero_history_sends_only_the_new_message() -> None:
    """With max_history_messages=0 a continued conversation sends no earlier message."""
    first, second = await prompts(LimitsConfig(max_history_messages=0), "one", "two")
    assert ("<|user|>one\n<|assistant|>", "<|user|>two\n<|assistant|>") == (first, second)


async def test_the_engine_may_share_the_system_prompt_across_conversations() -> None:
    """Each request names its conversation as the cache scope, and the opening every
    conversation has (system prompt and template, up to the user's text) as the part
    whose cached keys any conversation may reuse; without a system prompt, the
    template's opening alone."""
    for system, opening in (("Be brief.", "<|system|>Be brief.\n<|user|>"), ("", "<|user|>")):
        backend = FakeBackend(reply=REPLY)
        limits = LimitsConfig(system_prompt=system)
        async with running_server(backend, config_for_tests(limits=limits)) as running:
            first = await complete(running, "Hi")
            await complete(running, "Again", first)
            second = await complete(running, "Hi")
        scopes = [log.request.cache_scope for log in backend.requests]
        assert [first, first, second] == scopes
        assert first != second
        shared = {log.request.shared_prefix_tokens for log in backend.requests}
        assert {len(opening.encode())} == shared
