"""CompleteRequest.context: client-kept history reaches the template, bounded, never stored."""

from __future__ import annotations

import grpc
import pytest

from tokenwire.config import LimitsConfig
from tokenwire.proto.v1 import chat_pb2, conversations_pb2
from tokenwire.testing import FakeBackend, config_for_tests, running_server


def ctx(*pairs: tuple[str, str]) -> list[chat_pb2.ContextMessage]:
    return [chat_pb2.ContextMessage(role=role, content=content) for role, content in pairs]


async def test_context_messages_reach_the_template_in_order() -> None:
    """System messages lead, then the earlier exchange, then the new message."""
    backend = FakeBackend(reply="ok")
    limits = LimitsConfig(system_prompt="Be brief.")
    async with running_server(backend, config_for_tests(limits=limits)) as running:
        request = chat_pb2.CompleteRequest(
            message="And now?",
            context=ctx(("system", "Speak French."), ("user", "Hi"), ("assistant", "Salut")),
        )
        events = [event async for event in running.chat.Complete(request)]
    expected = (
        "<|system|>Be brief.\n<|system|>Speak French.\n<|user|>Hi\n<|assistant|>Salut\n"
        "<|user|>And now?\n<|assistant|>"
    )
    assert expected == bytes(backend.requests[-1].request.prompt_token_ids).decode()
    assert "finished" == events[-1].WhichOneof("event")


async def test_context_is_not_stored() -> None:
    """Only the new user message and the answer are stored."""
    async with running_server(FakeBackend(reply="ok")) as running:
        request = chat_pb2.CompleteRequest(
            message="Q", context=ctx(("user", "A"), ("assistant", "B"))
        )
        events = [event async for event in running.chat.Complete(request)]
        listed = await running.conversations.ListMessages(
            conversations_pb2.ListMessagesRequest(conversation_id=events[0].started.conversation_id)
        )
    assert [("user", "Q"), ("assistant", "ok")] == [(m.role, m.content) for m in listed.messages]


async def test_a_start_turn_carries_context_too() -> None:
    """Converse's StartTurn takes the same context."""
    backend = FakeBackend(reply="ok")
    async with running_server(backend) as running:
        start = chat_pb2.StartTurn(message="Q", context=ctx(("user", "A"), ("assistant", "B")))
        call = running.chat.Converse()
        await call.write(chat_pb2.ConverseRequest(start=start))
        async for event in call:
            if event.WhichOneof("event") == "finished":
                break
        await call.done_writing()
        call.cancel()
    prompt = bytes(backend.requests[-1].request.prompt_token_ids).decode()
    assert "<|user|>A\n<|assistant|>B\n<|user|>Q\n<|assistant|>" == prompt


@pytest.mark.parametrize(
    ("context", "conversation_id", "needle"),
    [
        (ctx(("tool", "x")), "", "role"),
        (ctx(*[("user", "x")] * 3), "", "limit is 2"),
        (ctx(("user", "x" * 101)), "", "limit is 100"),
        (ctx(("user", "x")), "conv_1", "conversation_id"),
    ],
)
async def test_context_out_of_bounds_is_invalid_argument(
    context: list[chat_pb2.ContextMessage], conversation_id: str, needle: str
) -> None:
    """Unknown roles, too many or too long messages, or context with a stored conversation."""
    backend = FakeBackend(reply="ok")
    limits = LimitsConfig(max_history_messages=2, max_message_chars=100)
    async with running_server(backend, config_for_tests(limits=limits)) as running:
        request = chat_pb2.CompleteRequest(
            message="Q", context=context, conversation_id=conversation_id
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _ = [event async for event in running.chat.Complete(request)]
    assert grpc.StatusCode.INVALID_ARGUMENT == refused.value.code()
    assert needle in (refused.value.details() or "")
    assert [] == backend.requests
