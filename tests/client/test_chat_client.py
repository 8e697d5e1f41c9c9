"""The ``tokenwire chat`` client against a scripted ChatService on a real server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from tokenwire import client as chat_client
from tokenwire.client import ChatOptions, ChatSession, LineReader
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc

WORDS = ("Paris", " is", " the", " capital", " of", " France", ".")
ANSWER = "".join(WORDS)
Context = grpc.aio.ServicerContext[Any, Any]


class FakeChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """A test double: answers every turn with WORDS, one Delta each, and records requests.

    A Converse turn whose message is "fail" is refused with a TurnError.
    """

    def __init__(self) -> None:
        self.delay_s = 0.0  # Pause before each Delta, so a cancel can land mid-answer.
        self.start_delay_s = 0.0  # Pause before TurnStarted.
        self.finish_reason: chat_pb2.FinishReason.ValueType = chat_pb2.FINISH_REASON_STOP
        self.abort_with: grpc.StatusCode | None = None  # Ends either RPC with this status.
        self.ignore_cancel = False
        self.complete_requests: list[chat_pb2.CompleteRequest] = []
        self.converse_requests: list[chat_pb2.ConverseRequest] = []
        self.metadata: list[dict[str, str | bytes]] = []
        self._turns = 0

    def _started(self, conversation_id: str) -> chat_pb2.TurnStarted:
        self._turns += 1
        return chat_pb2.TurnStarted(
            turn_id=f"turn-{self._turns}",
            conversation_id=conversation_id or f"conversation-{self._turns}",
            message_id=f"message-{self._turns}",
            model="fake-model",
        )

    def _finished(
        self, turn_id: str, reason: chat_pb2.FinishReason.ValueType, tokens: int
    ) -> chat_pb2.TurnFinished:
        usage = chat_pb2.Usage(
            prompt_tokens=12, completion_tokens=tokens, time_to_first_token_ms=34.0
        )
        return chat_pb2.TurnFinished(finish_reason=reason, usage=usage, turn_id=turn_id)

    async def Complete(
        self, request: chat_pb2.CompleteRequest, context: Context
    ) -> AsyncIterator[chat_pb2.CompleteResponse]:
        self.complete_requests.append(request)
        self.metadata.append(dict(context.invocation_metadata() or ()))
        if self.abort_with is not None:
            await context.abort(self.abort_with, "message must not be empty")
        started = self._started(request.conversation_id)
        yield chat_pb2.CompleteResponse(started=started)
        for word in WORDS:
            yield chat_pb2.CompleteResponse(delta=chat_pb2.Delta(text=word, token_count=1))
        finished = self._finished(started.turn_id, self.finish_reason, len(WORDS))
        yield chat_pb2.CompleteResponse(finished=finished)

    async def Converse(
        self, request_iterator: AsyncIterator[chat_pb2.ConverseRequest], context: Context
    ) -> AsyncIterator[chat_pb2.ConverseResponse]:
        self.metadata.append(dict(context.invocation_metadata() or ()))
        starts: asyncio.Queue[chat_pb2.StartTurn | None] = asyncio.Queue()
        cancelled = asyncio.Event()

        async def read_requests() -> None:
            async for request in request_iterator:
                self.converse_requests.append(request)
                if request.HasField("cancel"):
                    cancelled.set()
                else:
                    starts.put_nowait(request.start)
            starts.put_nowait(None)

        reading = asyncio.create_task(read_requests())
        try:
            while (start := await starts.get()) is not None:
                if self.abort_with is not None:
                    await context.abort(self.abort_with, "the server is shutting down")
                if start.message == "fail":
                    error = chat_pb2.TurnError(
                        code=3, message="message is too long", error_type="invalid_argument"
                    )
                    yield chat_pb2.ConverseResponse(error=error)
                    continue
                cancelled.clear()
                await asyncio.sleep(self.start_delay_s)
                started = self._started(start.conversation_id)
                yield chat_pb2.ConverseResponse(started=started)
                reason, sent = chat_pb2.FINISH_REASON_STOP, 0
                for word in WORDS:
                    await asyncio.sleep(self.delay_s)
                    if cancelled.is_set() and not self.ignore_cancel:
                        reason = chat_pb2.FINISH_REASON_CANCELLED
                        break
                    yield chat_pb2.ConverseResponse(delta=chat_pb2.Delta(text=word, token_count=1))
                    sent += 1
                finished = self._finished(started.turn_id, reason, sent)
                yield chat_pb2.ConverseResponse(finished=finished)
        finally:
            reading.cancel()

    def starts(self) -> list[chat_pb2.StartTurn]:
        """The StartTurn messages received on Converse streams, in order."""
        return [r.start for r in self.converse_requests if r.HasField("start")]

    def cancels(self) -> list[chat_pb2.CancelTurn]:
        """The CancelTurn messages received on Converse streams, in order."""
        return [r.cancel for r in self.converse_requests if r.HasField("cancel")]


@pytest.fixture
def fake_chat() -> FakeChatServicer:
    """A scripted ChatService."""
    return FakeChatServicer()


@pytest.fixture
async def chat_target(fake_chat: FakeChatServicer) -> AsyncIterator[str]:
    """The address of a real grpc.aio server on port 0 serving ``fake_chat``."""
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(fake_chat, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
def closed_target() -> str:
    """An address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def scripted(*lines: str) -> LineReader:
    """A line reader that returns ``lines``, then end of input."""
    remaining = list(lines)

    async def read_line() -> str | None:
        return remaining.pop(0) if remaining else None

    return read_line


async def never() -> str | None:
    """A line reader for a user who never types."""
    await asyncio.Event().wait()
    return None


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll until ``condition()`` holds, or fail after ``timeout_s`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def session_to(
    target: str, options: ChatOptions | None = None
) -> AsyncIterator[tuple[ChatSession, io.StringIO, io.StringIO]]:
    """A ChatSession on a fresh channel to ``target``, with its captured output streams."""
    out, err = io.StringIO(), io.StringIO()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        yield ChatSession(stub, options=options, out=out, err=err), out, err


def parse(*argv: str) -> argparse.Namespace:
    """Parse ``argv`` with a parser that ``add_arguments`` built."""
    parser = argparse.ArgumentParser(prog="tokenwire chat")
    chat_client.add_arguments(parser)
    return parser.parse_args(argv)


# One-shot: Complete.


async def test_one_shot_prints_the_streamed_answer_and_exits_0(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """One question prints the deltas joined, then a newline, and exits 0."""
    out, err = io.StringIO(), io.StringIO()
    code = await chat_client.run_one_shot(chat_target, "Capital of France?", out=out, err=err)
    assert (code, out.getvalue(), err.getvalue()) == (chat_client.EXIT_OK, ANSWER + "\n", "")
    assert [r.message for r in fake_chat.complete_requests] == ["Capital of France?"]


async def test_one_shot_sends_options_and_the_api_key(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """Sampling flags, model, conversation and API key all reach the server."""
    options = ChatOptions.from_args(
        parse(
            *("--temperature", "0.5", "--top-p", "0.9", "--top-k", "40", "--max-tokens", "64"),
            *("--seed", "7", "--stop", "\n\n", "--stop", "END", "--model", "small"),
            *("--conversation", "c-9", "--api-key", "sk-test", "hi"),
        )
    )
    await chat_client.run_one_shot(chat_target, "hi", options=options, out=io.StringIO())
    expected = chat_pb2.CompleteRequest(
        conversation_id="c-9",
        message="hi",
        model="small",
        params=chat_pb2.SamplingParams(
            temperature=0.5, top_p=0.9, top_k=40, max_tokens=64, stop=["\n\n", "END"], seed=7
        ),
    )
    assert fake_chat.complete_requests == [expected]
    assert fake_chat.metadata[0]["authorization"] == "Bearer sk-test"


async def test_one_shot_without_api_key_sends_no_authorization(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """No key means no authorization header, and an unset seed stays unset."""
    await chat_client.run_one_shot(chat_target, "hi", out=io.StringIO())
    assert "authorization" not in fake_chat.metadata[0]
    assert not fake_chat.complete_requests[0].params.HasField("seed")


async def test_one_shot_invalid_argument_exits_2_with_the_error(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """A call refused as INVALID_ARGUMENT prints the status and exits 2."""
    fake_chat.abort_with = grpc.StatusCode.INVALID_ARGUMENT
    out, err = io.StringIO(), io.StringIO()
    code = await chat_client.run_one_shot(chat_target, "", out=out, err=err)
    expected = "error: INVALID_ARGUMENT: message must not be empty\n"
    assert code == chat_client.EXIT_INVALID_ARGUMENT
    assert (out.getvalue(), err.getvalue()) == ("", expected)


async def test_one_shot_against_a_closed_port_exits_3(closed_target: str) -> None:
    """No server at the target: UNAVAILABLE, a hint to start one, exit 3."""
    err = io.StringIO()
    code = await chat_client.run_one_shot(closed_target, "hi", out=io.StringIO(), err=err)
    assert code == chat_client.EXIT_UNAVAILABLE
    assert err.getvalue().startswith("error: UNAVAILABLE: ")
    assert "tokenwire serve" in err.getvalue()


async def test_one_shot_notes_a_length_finish_on_stderr(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """An answer cut by max_tokens is printed whole, noted on stderr, and exits 0."""
    fake_chat.finish_reason = chat_pb2.FINISH_REASON_LENGTH
    out, err = io.StringIO(), io.StringIO()
    code = await chat_client.run_one_shot(chat_target, "hi", out=out, err=err)
    assert (code, out.getvalue()) == (chat_client.EXIT_OK, ANSWER + "\n")
    assert err.getvalue() == "[stopped: max tokens reached]\n"


async def test_one_shot_error_finish_exits_1(chat_target: str, fake_chat: FakeChatServicer) -> None:
    """An answer the model failed to finish exits 1."""
    fake_chat.finish_reason = chat_pb2.FINISH_REASON_ERROR
    err = io.StringIO()
    code = await chat_client.run_one_shot(chat_target, "hi", out=io.StringIO(), err=err)
    assert code == chat_client.EXIT_FAILURE
    assert err.getvalue() == "[stopped: the model failed mid-answer]\n"


async def test_verbose_prints_usage_and_time_to_first_token(chat_target: str) -> None:
    """--verbose adds one line of usage, with the conversation id to continue."""
    err = io.StringIO()
    options = ChatOptions(verbose=True)
    await chat_client.run_one_shot(chat_target, "hi", options=options, out=io.StringIO(), err=err)
    expected = (
        "[conversation conversation-1, turn turn-1, model fake-model: "
        "12 prompt + 7 completion tokens, first token after 34 ms]\n"
    )
    assert err.getvalue() == expected


async def test_ask_returns_the_turn_result(chat_target: str) -> None:
    """ask() returns the joined answer with the ids and usage the server sent."""
    result = await chat_client.ask(chat_target, "hi")
    assert (result.text, result.finish_reason) == (ANSWER, chat_pb2.FINISH_REASON_STOP)
    assert (result.turn_id, result.conversation_id) == ("turn-1", "conversation-1")
    assert result.model == "fake-model"
    assert result.usage.completion_tokens == 7


async def test_main_runs_one_shot_from_parsed_arguments(
    chat_target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() answers a question given on the command line, on stdout."""
    # main() runs its own event loop, so it needs a thread of its own.
    code = await asyncio.to_thread(chat_client.main, parse("--target", chat_target, "hi"))
    assert (code, capsys.readouterr().out) == (0, ANSWER + "\n")


# Arguments.


def test_arguments_default_to_greedy_on_the_local_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Without flags or environment: local target, greedy, no key, interactive."""
    monkeypatch.delenv(chat_client.TARGET_ENV, raising=False)
    monkeypatch.delenv(chat_client.API_KEY_ENV, raising=False)
    monkeypatch.delenv(chat_client.API_KEY_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no .tokenwire/admin.key left by a server run here
    args = parse()
    assert (args.question, args.target, args.api_key) == (None, "127.0.0.1:50051", None)
    assert ChatOptions.from_args(args) == ChatOptions()


def test_target_and_api_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """TOKENWIRE_TARGET and TOKENWIRE_API_KEY set the defaults; flags still win."""
    monkeypatch.setenv(chat_client.TARGET_ENV, "chat.internal:443")
    monkeypatch.setenv(chat_client.API_KEY_ENV, "sk-env")
    assert (parse().target, parse().api_key) == ("chat.internal:443", "sk-env")
    assert parse("--target", "other:1").target == "other:1"


def test_timeout_must_be_positive() -> None:
    """--timeout 0 is a usage error."""
    with pytest.raises(SystemExit):
        parse("--timeout", "0")


def test_exit_codes_follow_the_status() -> None:
    """INVALID_ARGUMENT maps to 2, UNAVAILABLE to 3, anything else to 1."""
    codes = [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
    ]
    assert [chat_client.exit_code_for(code) for code in codes] == [2, 3, 1]


# Interactive: Converse.


async def test_second_turn_continues_the_first_turns_conversation(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """The conversation id from the first TurnStarted goes into the second StartTurn."""
    async with session_to(chat_target) as (session, out, err):
        code = await session.run(scripted("Capital of France?", "And of Italy?"))
    assert [(start.conversation_id, start.message) for start in fake_chat.starts()] == [
        ("", "Capital of France?"),
        ("conversation-1", "And of Italy?"),
    ]
    expected = f"you> bot> {ANSWER}\nyou> bot> {ANSWER}\nyou> \n"
    assert (code, out.getvalue(), err.getvalue()) == (0, expected, "")


async def test_new_starts_a_new_conversation(chat_target: str, fake_chat: FakeChatServicer) -> None:
    """/new sends the next turn without a conversation id; --conversation seeds the first."""
    options = ChatOptions(conversation_id="c-0")
    async with session_to(chat_target, options) as (session, _, err):
        await session.run(scripted("one", "two", "/new", "three"))
    assert [start.conversation_id for start in fake_chat.starts()] == ["c-0", "c-0", ""]
    assert err.getvalue() == "[new conversation]\n"
    assert session.conversation_id == "conversation-3"


async def test_quit_command_ends_the_session(chat_target: str, fake_chat: FakeChatServicer) -> None:
    """/quit exits 0 without reading further lines."""
    async with session_to(chat_target) as (session, _, _):
        code = await session.run(scripted("/quit", "never sent"))
    assert (code, fake_chat.starts()) == (0, [])


async def test_turn_error_is_printed_and_the_session_goes_on(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """A TurnError prints "error: ..." and the next turn still runs."""
    async with session_to(chat_target) as (session, out, err):
        code = await session.run(scripted("fail", "hello"))
    assert err.getvalue() == "error: INVALID_ARGUMENT: message is too long\n"
    assert (code, out.getvalue()) == (0, f"you> you> bot> {ANSWER}\nyou> \n")


async def test_interrupt_while_answering_sends_cancel_turn(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """Ctrl-C mid-answer sends CancelTurn for that turn, prints [cancelled], goes on."""
    fake_chat.delay_s = 0.1
    async with session_to(chat_target) as (session, out, err):
        run = asyncio.create_task(session.run(scripted("Tell me a long story")))
        await eventually(lambda: "bot> Paris" in out.getvalue())
        session.interrupt()
        code = await run
    assert [cancel.turn_id for cancel in fake_chat.cancels()] == ["turn-1"]
    assert (code, err.getvalue()) == (0, "[cancelled]\n")
    assert ANSWER not in out.getvalue()


async def test_interrupt_before_turn_started_cancels_once_the_turn_is_named(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """Ctrl-C before TurnStarted waits for the turn id, then sends CancelTurn with it."""
    fake_chat.start_delay_s = 0.2
    fake_chat.delay_s = 0.1
    async with session_to(chat_target) as (session, _, err):
        run = asyncio.create_task(session.run(scripted("hi")))
        await eventually(lambda: bool(fake_chat.starts()))
        session.interrupt()
        code = await run
    assert [cancel.turn_id for cancel in fake_chat.cancels()] == ["turn-1"]
    assert (code, err.getvalue()) == (0, "[cancelled]\n")


async def test_second_interrupt_gives_up_on_the_turn(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """A second Ctrl-C while the cancelled turn still streams ends the session with 130."""
    fake_chat.delay_s = 0.1
    fake_chat.ignore_cancel = True
    async with session_to(chat_target) as (session, out, err):
        run = asyncio.create_task(session.run(scripted("hi", "never sent")))
        await eventually(lambda: "bot> Paris" in out.getvalue())
        session.interrupt()
        await eventually(lambda: bool(fake_chat.cancels()))
        session.interrupt()
        code = await run
    assert (code, err.getvalue()) == (chat_client.EXIT_INTERRUPTED, "[interrupted]\n")
    assert len(fake_chat.starts()) == 1


async def test_interrupt_at_the_prompt_quits_cleanly(chat_target: str) -> None:
    """Ctrl-C while waiting for input ends the session with exit code 0."""
    async with session_to(chat_target) as (session, out, _):
        run = asyncio.create_task(session.run(never))
        await eventually(lambda: out.getvalue() == "you> ")
        session.interrupt()
        assert await run == 0


async def test_turn_timeout_cancels_the_turn(chat_target: str, fake_chat: FakeChatServicer) -> None:
    """--timeout cancels a turn that runs too long and says so."""
    fake_chat.delay_s = 0.1
    async with session_to(chat_target, ChatOptions(timeout_s=0.25)) as (session, _, err):
        code = await session.run(scripted("hi"))
    assert (code, err.getvalue()) == (0, "[timed out after 0.25s]\n")
    assert [cancel.turn_id for cancel in fake_chat.cancels()] == ["turn-1"]


async def test_broken_stream_ends_the_session_with_its_status(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """A Converse stream that fails with UNAVAILABLE prints the error and exits 3."""
    fake_chat.abort_with = grpc.StatusCode.UNAVAILABLE
    async with session_to(chat_target) as (session, _, err):
        code = await session.run(scripted("hi", "never sent"))
    assert code == chat_client.EXIT_UNAVAILABLE
    assert err.getvalue().startswith("error: UNAVAILABLE: the server is shutting down\n")


async def test_interactive_against_a_closed_port_exits_3_before_prompting(
    closed_target: str,
) -> None:
    """No server at the target: the session fails at once, without a prompt."""
    out, err = io.StringIO(), io.StringIO()
    code = await chat_client.run_interactive(closed_target, read_line=never, out=out, err=err)
    assert (code, out.getvalue()) == (chat_client.EXIT_UNAVAILABLE, "")
    assert err.getvalue().startswith("error: UNAVAILABLE: ")


async def test_interactive_reads_lines_from_stdin(
    chat_target: str, fake_chat: FakeChatServicer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a line reader the session reads stdin until end of input."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\n\nsecond\n"))
    out = io.StringIO()
    code = await chat_client.run_interactive(chat_target, out=out, err=io.StringIO())
    assert (code, [start.message for start in fake_chat.starts()]) == (0, ["first", "second"])


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
async def test_real_sigint_while_answering_cancels_the_turn(
    chat_target: str, fake_chat: FakeChatServicer
) -> None:
    """A real SIGINT during an answer reaches the session as a cancel, not KeyboardInterrupt."""
    fake_chat.delay_s = 0.1
    out, err = io.StringIO(), io.StringIO()
    run = asyncio.create_task(
        chat_client.run_interactive(chat_target, read_line=scripted("hi"), out=out, err=err)
    )
    await eventually(lambda: "bot> Paris" in out.getvalue())
    assert not run.done()  # The handler is still installed, so the signal is safe to send.
    os.kill(os.getpid(), signal.SIGINT)
    assert (await run, err.getvalue()) == (0, "[cancelled]\n")
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_api_key_is_read_from_the_key_file_when_not_given(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --api-key or TOKENWIRE_API_KEY, the key file the server wrote is used."""
    monkeypatch.delenv(chat_client.API_KEY_ENV, raising=False)
    key_file = tmp_path / "admin.key"
    key_file.write_text("tw_secret123\n")
    parser = argparse.ArgumentParser()
    chat_client.add_arguments(parser)
    options = ChatOptions.from_args(parser.parse_args(["--api-key-file", str(key_file), "hi"]))
    assert (("authorization", "Bearer tw_secret123"),) == options.metadata()
    given = parser.parse_args(["--api-key-file", str(key_file), "--api-key", "tw_other", "hi"])
    assert (("authorization", "Bearer tw_other"),) == ChatOptions.from_args(given).metadata()
    missing = parser.parse_args(["--api-key-file", str(tmp_path / "none"), "hi"])
    assert ChatOptions.from_args(missing).metadata() is None
