"""The ``tokenwire chat`` client against the real ChatService on an in-process server."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tokenwire import cli
from tokenwire.backend import FinishReason
from tokenwire.client import (
    EXIT_INVALID_ARGUMENT,
    EXIT_OK,
    ChatOptions,
    ChatSession,
    LineReader,
    ask,
    run_interactive,
    run_one_shot,
)
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import FakeBackend, running_server

REPLY = "Hello, world!"
STORY = "Once upon a time there was a token that would not stop streaming. " * 4
# The line --verbose prints after each turn: which conversation and turn it was.
VERBOSE_LINE = re.compile(r"\[conversation (\S+), turn (\S+), model fake: .*\]")


def scripted(*lines: str) -> LineReader:
    """A line reader that returns ``lines``, then end of input."""
    remaining = list(lines)

    async def read_line() -> str | None:
        return remaining.pop(0) if remaining else None

    return read_line


def prompt_of(fake: FakeBackend, index: int) -> str:
    """The templated prompt of the fake engine's ``index``-th request (its tokens are bytes)."""
    return bytes(fake.requests[index].request.prompt_token_ids).decode()


def turns_reported(err: str) -> list[tuple[str, str]]:
    """The (conversation id, turn id) of every --verbose line in ``err``."""
    return [(match[1], match[2]) for match in VERBOSE_LINE.finditer(err)]


# One-shot: Complete.


async def test_one_shot_prints_the_answer_and_exits_0() -> None:
    """One question prints the server's answer and a newline, nothing on stderr, and exits 0."""
    out, err = io.StringIO(), io.StringIO()
    async with running_server(FakeBackend(reply=REPLY)) as running:
        code = await run_one_shot(running.address, "Hi", out=out, err=err)
    assert (EXIT_OK, REPLY + "\n", "") == (code, out.getvalue(), err.getvalue())


async def test_ask_returns_what_the_server_said() -> None:
    """ask() returns the answer with the conversation, model and usage the server reported."""
    async with running_server(FakeBackend(reply=REPLY)) as running:
        result = await ask(running.address, "Hi")
    assert (REPLY, chat_pb2.FINISH_REASON_STOP) == (result.text, result.finish_reason)
    assert ("fake", len(REPLY)) == (result.model, result.usage.completion_tokens)
    assert result.conversation_id.startswith("conv_")
    assert result.turn_id.startswith("turn_")


async def test_one_shot_max_tokens_cuts_the_answer_and_says_so() -> None:
    """--max-tokens reaches the server: the answer stops short, with a note on stderr."""
    out, err = io.StringIO(), io.StringIO()
    options = ChatOptions(max_tokens=5)
    async with running_server(FakeBackend(reply=REPLY)) as running:
        code = await run_one_shot(running.address, "Hi", options=options, out=out, err=err)
    expected = (EXIT_OK, "Hello\n", "[stopped: max tokens reached]\n")
    assert expected == (code, out.getvalue(), err.getvalue())


async def test_one_shot_empty_question_exits_2() -> None:
    """The server refuses an empty question as INVALID_ARGUMENT; the client exits 2."""
    out, err = io.StringIO(), io.StringIO()
    async with running_server(FakeBackend(reply=REPLY)) as running:
        code = await run_one_shot(running.address, "", out=out, err=err)
    expected = (EXIT_INVALID_ARGUMENT, "", "error: INVALID_ARGUMENT: message must not be empty\n")
    assert expected == (code, out.getvalue(), err.getvalue())


async def test_one_shot_continues_the_conversation_it_names() -> None:
    """--conversation makes the server answer with that conversation's history in the prompt."""
    fake = FakeBackend(reply=REPLY)
    async with running_server(fake) as running:
        first = await ask(running.address, "first question")
        options = ChatOptions(conversation_id=first.conversation_id)
        second = await ask(running.address, "second question", options=options)
    assert first.conversation_id == second.conversation_id
    prompt = prompt_of(fake, 1)
    assert prompt.index("first question") < prompt.index(REPLY) < prompt.index("second question")


async def test_tokenwire_chat_command_answers_a_question(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``tokenwire chat --target ADDRESS "Hi"`` prints the answer and exits 0."""
    monkeypatch.chdir(tmp_path)  # no key file left by a server run in the working directory
    async with running_server(FakeBackend(reply=REPLY)) as running:
        argv = ["chat", "--target", running.address, "Hi"]
        # The command runs its own event loop, so it needs a thread of its own.
        code = await asyncio.to_thread(cli.main, argv)
    assert (EXIT_OK, REPLY + "\n") == (code, capsys.readouterr().out)


# Interactive: Converse.


async def test_session_turns_continue_the_conversation_the_server_named() -> None:
    """The second turn goes to the conversation the first TurnStarted named, with its history."""
    fake = FakeBackend(reply=REPLY)
    out, err = io.StringIO(), io.StringIO()
    options = ChatOptions(verbose=True)
    async with running_server(fake) as running:
        code = await run_interactive(
            running.address,
            options=options,
            read_line=scripted("first question", "second question"),
            out=out,
            err=err,
        )
    expected_out = f"you> bot> {REPLY}\nyou> bot> {REPLY}\nyou> \n"
    assert (EXIT_OK, expected_out) == (code, out.getvalue())
    (first_conversation, first_turn), (second_conversation, second_turn) = turns_reported(
        err.getvalue()
    )
    assert first_conversation == second_conversation
    assert first_turn != second_turn
    prompt = prompt_of(fake, 1)
    assert prompt.index("first question") < prompt.index(REPLY) < prompt.index("second question")


async def test_new_command_starts_another_conversation() -> None:
    """/new makes the server open a fresh conversation, which the session then continues."""
    fake = FakeBackend(reply=REPLY)
    out, err = io.StringIO(), io.StringIO()
    async with running_server(fake) as running:
        session = ChatSession(running.chat, options=ChatOptions(verbose=True), out=out, err=err)
        code = await session.run(scripted("one", "/new", "two"))
    (first, _), (second, _) = turns_reported(err.getvalue())
    assert (EXIT_OK, second) == (code, session.conversation_id)
    assert first != second
    assert "one" not in prompt_of(fake, 1)


async def test_interrupt_cancels_a_slow_answer_and_the_session_goes_on() -> None:
    """An interrupt mid-answer prints [cancelled], stops the engine, and the next turn runs."""
    fake = FakeBackend(reply=STORY, token_delay_s=0.05)
    out, err = io.StringIO(), io.StringIO()
    async with running_server(fake) as running:
        session = ChatSession(running.chat, out=out, err=err, target=running.address)
        run = asyncio.create_task(session.run(scripted("Tell me a story", "Once more")))
        await wait_until(lambda: "bot> Once" in out.getvalue())
        session.interrupt()
        # Stream the second answer at full speed; only the first one needs to be slow.
        fake.token_delay_s = 0.0
        code = await run
    first_answer, second_answer = out.getvalue().split("you> ")[1:3]
    assert (EXIT_OK, "[cancelled]\n") == (code, err.getvalue())
    assert first_answer.startswith("bot> Once")
    assert len(first_answer) < len(f"bot> {STORY}\n")
    assert f"bot> {STORY}\n" == second_answer
    assert (True, FinishReason.STOP) == (fake.requests[0].closed, fake.requests[1].finished)
    assert "Tell me a story" in prompt_of(fake, 1)  # the same conversation went on
