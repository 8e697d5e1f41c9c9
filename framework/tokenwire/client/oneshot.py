"""One question, one answer: ``tokenwire chat "<question>"``.

The question goes to ``ChatService.Complete``; the answer streams to stdout as
it arrives, notes and errors go to stderr, and the chat ends with an exit code::

    result = await ask("127.0.0.1:50051", "What is 2 + 2?", out=sys.stdout)
    exit_code = await run_one_shot("127.0.0.1:50051", "What is 2 + 2?")
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

import grpc

from tokenwire.client.options import ChatOptions
from tokenwire.client.results import (
    EXIT_FAILURE,
    EXIT_OK,
    TurnResult,
    exit_code_for,
    report_failure,
    report_finish,
    write_flushed,
)
from tokenwire.proto.v1 import chat_pb2, chat_pb2_grpc

if TYPE_CHECKING:
    from tokenwire.proto.v1.chat_pb2_grpc import ChatServiceAsyncStub

__all__ = ["ask", "run_one_shot"]


async def ask(
    target: str, question: str, *, options: ChatOptions | None = None, out: TextIO | None = None
) -> TurnResult:
    """Ask one question with ``ChatService.Complete``; stream the answer to ``out``.

    Each delta is written and flushed as it arrives, then a newline. Raises
    ``grpc.aio.AioRpcError`` when the call fails::

        result = await ask("127.0.0.1:50051", "What is 2 + 2?", out=sys.stdout)
    """
    options = options or ChatOptions()
    request = chat_pb2.CompleteRequest(
        conversation_id=options.conversation_id,
        message=question,
        params=options.sampling_params(),
        model=options.model,
    )
    started, finished = chat_pb2.TurnStarted(), chat_pb2.TurnFinished()
    texts: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub: ChatServiceAsyncStub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.Complete(request, timeout=options.timeout_s, metadata=options.metadata())
        try:
            async for response in call:
                event = response.WhichOneof("event")
                if event == "started":
                    started.CopyFrom(response.started)
                elif event == "delta":
                    texts.append(response.delta.text)
                    if out is not None:
                        write_flushed(out, response.delta.text)
                elif event == "finished":
                    finished.CopyFrom(response.finished)
        except grpc.aio.AioRpcError:
            # End a partial answer's line so the error starts on a line of its own.
            if out is not None and any(texts):
                write_flushed(out, "\n")
            raise
    if out is not None:
        write_flushed(out, "\n")
    return TurnResult(
        text="".join(texts),
        finish_reason=finished.finish_reason,
        turn_id=started.turn_id,
        conversation_id=started.conversation_id,
        model=started.model,
        usage=finished.usage,
    )


async def run_one_shot(
    target: str,
    question: str,
    *,
    options: ChatOptions | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Ask one question, print the answer to ``out`` (stdout) and notes to ``err`` (stderr).

    Returns the exit code: a failed call prints ``error: <CODE>: <details>``
    and maps its status with :func:`exit_code_for`; an answer the model failed
    to finish is ``EXIT_FAILURE``; any other finished answer is ``EXIT_OK``.
    """
    options = options or ChatOptions()
    err = err or sys.stderr
    try:
        result = await ask(target, question, options=options, out=out or sys.stdout)
    except grpc.aio.AioRpcError as error:
        report_failure(err, error.code(), error.details() or "", target)
        return exit_code_for(error.code())
    report_finish(err, result, cancel_note=None, verbose=options.verbose)
    return EXIT_FAILURE if result.finish_reason == chat_pb2.FINISH_REASON_ERROR else EXIT_OK
