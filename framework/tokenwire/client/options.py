"""How every turn of a ``tokenwire chat`` is asked: :class:`ChatOptions`.

Each field is a ``tokenwire chat`` flag too; the API key may come from the
environment or a key file instead::

    options = ChatOptions(temperature=0.7, verbose=True)
    options.sampling_params()  # the SamplingParams message to send
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from tokenwire.proto.v1 import chat_pb2

__all__ = ["API_KEY_ENV", "ChatOptions"]

API_KEY_ENV = "TOKENWIRE_API_KEY"
"""Environment variable holding the API key, which keeps it out of shell history."""


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:  # Also refuses NaN.
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def _option(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    metavar: str | None = None,
    **extra: Any,
) -> Any:
    """A ChatOptions field; ``help`` documents it and becomes its flag's help text."""
    metadata = {"help": help, "flags": flags, "metavar": metavar, **extra}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class ChatOptions:
    """How every turn of a chat is asked; each field is a ``tokenwire chat`` flag too.

    As in ``SamplingParams``, zero values mean "the server's default" (a zero
    temperature is greedy decoding)::

        options = ChatOptions(temperature=0.7, max_tokens=256, stop=("\\n\\n",))
    """

    model: str = _option("", "model to answer with (default: the server's default)")
    temperature: float = _option(0.0, "sampling temperature in [0, 2]; 0 is greedy (default)")
    top_p: float = _option(
        0.0, "sample from the likeliest tokens whose probabilities add up to P", metavar="P"
    )
    top_k: int = _option(0, "sample from the K likeliest tokens only", metavar="K")
    max_tokens: int = _option(0, "most tokens per answer (default: the server's)", metavar="N")
    seed: int | None = _option(None, "sampling seed, for answers that repeat", type=int)
    stop: tuple[str, ...] = _option((), "end answers before TEXT; repeatable", metavar="TEXT")
    conversation_id: str = _option(
        "",
        "continue this conversation (--verbose prints ids)",
        flags=("--conversation",),
        metavar="ID",
    )
    timeout_s: float | None = _option(
        None,
        "give up on an answer after this many seconds (default: never)",
        flags=("--timeout",),
        metavar="SECONDS",
        type=_positive_seconds,
    )
    api_key: str | None = _option(
        None, f"API key, sent as a bearer token (default: ${API_KEY_ENV})", metavar="KEY", type=str
    )
    verbose: bool = _option(
        False, "print token usage and time to first token", flags=("-v", "--verbose")
    )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ChatOptions:
        """Build options from a namespace parsed with :func:`~tokenwire.client.add_arguments`."""
        values = {option.name: getattr(args, option.name) for option in fields(cls)}
        api_key = args.api_key or _read_key_file(getattr(args, "api_key_file", None))
        return cls(**values | {"stop": tuple(args.stop or ()), "api_key": api_key})

    def sampling_params(self) -> chat_pb2.SamplingParams:
        """The ``SamplingParams`` message these options describe."""
        params = chat_pb2.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            stop=list(self.stop),
        )
        # seed is proto3 `optional`: only a field that is set asks for a seed.
        if self.seed is not None:
            params.seed = self.seed
        return params

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata: the API key as a bearer token, or ``None`` without one."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None


def _read_key_file(path: str | None) -> str | None:
    """The key in ``path`` (first line), or None when there is no such file."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().strip() or None
    except OSError:
        return None
