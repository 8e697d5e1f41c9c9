"""The OpenAI chat request, read and checked: its JSON becomes the gateway's ``CompleteRequest``.

What :mod:`tokenwire.edge.openai` needs before it calls the gateway: the body read
within its size limit, every field checked with an error that names the parameter,
the conversation split into context and the turn's message, and the HTTP headers
passed on as call metadata. No routes and no gRPC calls here::

    body = await read_json_body(request, limit)
    turn, stream, include_usage = complete_request(body)  # or BadRequestError
"""

from __future__ import annotations

import json
from typing import Any

from tokenwire.proto.v1 import chat_pb2

__all__ = ["BadRequestError", "complete_request", "forwarded_metadata", "read_json_body"]

_FORWARDED = ("authorization", "x-request-id")  # HTTP headers passed on as call metadata
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class BadRequestError(Exception):
    """The HTTP request itself is malformed: 400 (or ``status``) before any gRPC call."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


async def read_json_body(request: Any, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object; 413 past ``limit`` bytes, 400 if not an object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequestError(f"the request body is over {limit} bytes", status=413)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise BadRequestError(f"the request body is over {limit} bytes", status=413)
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("the request body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise BadRequestError("the request body must be a JSON object")
    return parsed


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise BadRequestError(f"{name} must be {what}", name)
    return value


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    param = f"messages[{index}].content"
    if not isinstance(content, list):
        raise BadRequestError(f"{param} must be a string or a list of text parts", param)
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text"):
            raise BadRequestError(f"{param}: only text parts are supported", param)
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequestError(f"{param}: a text part's text must be a string", param)
        texts.append(text)
    return "".join(texts)


def complete_request(body: dict[str, Any]) -> tuple[chat_pb2.CompleteRequest, bool, bool]:
    """The CompleteRequest an OpenAI request asks for, whether to stream, whether to add usage."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("messages must be a non-empty list", "messages")
    context = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequestError(f"messages[{i}] must be an object", f"messages[{i}]")
        role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise BadRequestError(
                f"messages[{i}].role must be one of {', '.join(_ROLES)}, "
                f"got {message.get('role')!r}",
                f"messages[{i}].role",
            )
        context.append(chat_pb2.ContextMessage(role=role, content=_content(message, i)))
    last = context.pop()
    if last.role != "user":
        raise BadRequestError("the last message must be the user's", f"messages[{len(context)}]")
    conversation_id = _field(body, "conversation_id", (str,), "a string") or ""
    model = _field(body, "model", (str,), "a string") or ""
    n = _field(body, "n", (int,), "an integer")
    if n not in (None, 1):
        raise BadRequestError("only n=1 is supported", "n")
    params = chat_pb2.SamplingParams()
    temperature = _field(body, "temperature", (int, float), "a number")
    if temperature is not None:
        params.temperature = temperature
    top_p = _field(body, "top_p", (int, float), "a number")
    if top_p is not None:
        params.top_p = top_p
    max_tokens = _field(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", (int,), "an integer")
    if max_tokens is not None:
        if not 1 <= max_tokens < 2**31:
            raise BadRequestError("max_tokens must be a positive integer", "max_tokens")
        params.max_tokens = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        params.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        params.stop.extend(stop)
    elif stop is not None:
        raise BadRequestError("stop must be a string or a list of strings", "stop")
    seed = _field(body, "seed", (int,), "an integer")
    if seed is not None:
        if not -(2**63) <= seed < 2**63:
            raise BadRequestError("seed must fit in 64 bits", "seed")
        params.seed = seed
    stream = bool(_field(body, "stream", (bool,), "a boolean"))
    options = _field(body, "stream_options", (dict,), "an object") or {}
    include_usage = bool(_field(options, "include_usage", (bool,), "a boolean"))
    request = chat_pb2.CompleteRequest(
        conversation_id=conversation_id,
        message=last.content,
        params=params,
        model=model,
        # A stored conversation is the history: the client's copy of it is not sent.
        context=[] if conversation_id else context,
    )
    return request, stream, include_usage


def forwarded_metadata(request: Any) -> tuple[tuple[str, str], ...]:
    """The call metadata for ``request``: its ``authorization`` and ``x-request-id`` headers."""
    return tuple(
        (name, value) for name in _FORWARDED if (value := request.headers.get(name)) is not None
    )
