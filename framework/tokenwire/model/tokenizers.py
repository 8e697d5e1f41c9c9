"""Tokenizers for the model frontend: chat template in, token ids out, text back.

Two implementations of :class:`Tokenizer`:

* :class:`TransformersTokenizer` loads a model's own tokenizer and chat template
  with ``transformers`` (from a checkpoint directory or the metadata of a GGUF
  file) and detokenizes incrementally with ``tokenizers.decoders.DecodeStream``,
  which never splits a multi-byte character across steps;
* :class:`ByteTokenizer` needs no files: each UTF-8 byte is one token. The fake
  backend uses it, and it makes multi-byte splitting easy to test.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from tokenwire.backend import ChatMessage, TokenizerSource
from tokenwire.errors import ConfigError

__all__ = [
    "ByteTokenizer",
    "Detokenizer",
    "Tokenizer",
    "TransformersTokenizer",
    "load_tokenizer",
]


@runtime_checkable
class Detokenizer(Protocol):
    """Turns a stream of token ids into text, one id at a time."""

    def step(self, token_id: int) -> str:
        """The text this token completes; empty while a character is still partial."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    """What the frontend needs of a tokenizer."""

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end an answer."""
        ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The model's chat template applied to ``messages``, with the generation prompt."""
        ...

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, without special tokens."""
        ...

    def detokenizer(self) -> Detokenizer:
        """A fresh incremental detokenizer for one answer."""
        ...


class ByteTokenizer:
    """Each UTF-8 byte is a token (ids 0..255); 256 ends an answer.

    The chat template is ``<|role|>content\\n`` per message, then ``<|assistant|>``.
    """

    EOS = 256
    vocab_size = 257

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({self.EOS})

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = "".join(f"<|{m.role}|>{m.content}\n" for m in messages) + "<|assistant|>"
        return self.encode(text)

    def detokenizer(self) -> Detokenizer:
        return _ByteDetokenizer()


_ASCII = tuple(chr(i) for i in range(128))


class _ByteDetokenizer:
    __slots__ = ("_decoder", "_pending")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = False  # the decoder holds the first bytes of a character

    def step(self, token_id: int) -> str:
        if token_id < 128 and not self._pending and token_id >= 0:
            return _ASCII[token_id]  # the common case, without the codec
        if not 0 <= token_id < 256:
            return ""
        text = str(self._decoder.decode(bytes((token_id,))))
        self._pending = bool(self._decoder.getstate()[0])
        return text


class TransformersTokenizer:
    """A model's own tokenizer and chat template, loaded with transformers."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._backend = tokenizer.backend_tokenizer  # the Rust tokenizers.Tokenizer
        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        # Chat models end a turn with their end-of-turn token, which is not always EOS.
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
        self._eos = frozenset(ids)

    @classmethod
    def load(cls, source: TokenizerSource) -> TransformersTokenizer:
        """Load from a checkpoint directory, or from ``gguf_file`` inside it. Blocking."""
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ConfigError(
                "loading a model tokenizer needs transformers: pip install 'tokenwire[torch]'"
            ) from exc
        kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the tokenizer from {source.path!r}: {exc}") from exc
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"the tokenizer in {source.path!r} has no chat template")
        return cls(tokenizer)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def save(self, directory: str) -> None:
        """Write the tokenizer's files (chat template included) into ``directory``."""
        self._tok.save_pretrained(directory)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        encoded = self._tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=True,
        )
        ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
        return list(ids)

    def detokenizer(self) -> Detokenizer:
        from tokenizers.decoders import DecodeStream

        return _StreamDetokenizer(DecodeStream(skip_special_tokens=True), self._backend)


class _StreamDetokenizer:
    __slots__ = ("_backend", "_stream")

    def __init__(self, stream: Any, backend: Any) -> None:
        self._stream = stream
        self._backend = backend

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


@functools.lru_cache(maxsize=8)
def load_tokenizer(source: TokenizerSource) -> Tokenizer:
    """The tokenizer a backend's capabilities point at. Blocking: call in a thread.

    Cached per source: tokenizers are read-only once loaded, and loading one from a
    GGUF file takes seconds.
    """
    if source.kind == "bytes":
        return ByteTokenizer()
    if source.kind == "transformers":
        return TransformersTokenizer.load(source)
    raise ConfigError(f"unknown tokenizer kind {source.kind!r}; known: transformers, bytes")
