"""Tensors of the Open Inference Protocol (KServe v2) as a chat turn, and back.

The tensor names are those of Triton's TensorRT-LLM ``ensemble`` model
(NVIDIA/TensorRT-LLM ``triton_backend/all_models/inflight_batcher_llm/ensemble/
config.pbtxt``), so a client written for that model works unchanged:

=====================  =======  ==================================================
input                  type     meaning here
=====================  =======  ==================================================
``text_input``         BYTES    the user's message (required, one element)
``max_tokens``         INT32    most tokens in the answer
``temperature``        FP32     0: greedy
``top_p`` ``top_k``    FP32     nucleus and top-k sampling
                       INT32
``seed``               UINT64   fixed sampling (``random_seed`` in older releases)
``stop_words``         BYTES    stop strings (any number of elements)
``stream``             BOOL     send the answer as deltas (default: one response)
``end_id`` ``pad_id``  INT32    accepted and ignored: the engine knows its own
=====================  =======  ==================================================

The ensemble's other inputs are accepted at their neutral values (``beam_width``
1, ``repetition_penalty`` 1.0, ``presence_penalty`` 0, ``return_log_probs`` false,
an empty ``bad_words``, ...) and refused otherwise, as this server cannot honour
them; ``return_num_input_tokens`` / ``return_num_output_tokens`` and
``exclude_input_in_output`` are accepted (counts are always returned, the input
never is).

Outputs: ``text_output`` (BYTES, the new text: a delta when streaming, the whole
answer otherwise) and ``num_output_tokens`` (INT32, the tokens that text covers)
in every response; in the last one also ``num_input_tokens`` (the prompt's
tokens), ``finish_reason`` (BYTES: stop, length, cancelled, content_filter) and
``conversation_id`` (BYTES; pass it back as the request parameter
``conversation_id`` to continue the conversation).

Values come as typed ``contents`` or as ``raw_input_contents`` (what tritonclient
sends): little-endian, BYTES elements each behind a 4-byte length. This module
imports no grpc and no protobuf; it reads and writes the messages' fields by name.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenwire.errors import InvalidArgumentError
from tokenwire.model.frontend import TurnParams
from tokenwire.turns.events import TurnRequest

__all__ = [
    "INPUTS",
    "OUTPUTS",
    "InferTurn",
    "bytes_tensor",
    "decode_tensor",
    "int32_tensor",
    "scalar_tensor",
    "turn_of",
]

# name -> (datatype, dims without the batch dimension, optional)
INPUTS: dict[str, tuple[str, tuple[int, ...], bool]] = {
    "text_input": ("BYTES", (1,), False),
    "max_tokens": ("INT32", (1,), True),
    "temperature": ("FP32", (1,), True),
    "top_p": ("FP32", (1,), True),
    "top_k": ("INT32", (1,), True),
    "seed": ("UINT64", (1,), True),
    "random_seed": ("UINT64", (1,), True),
    "stop_words": ("BYTES", (-1,), True),
    "stream": ("BOOL", (1,), True),
    "end_id": ("INT32", (1,), True),
    "pad_id": ("INT32", (1,), True),
}
OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "text_output": ("BYTES", (-1,)),
    "num_input_tokens": ("INT32", (1,)),
    "num_output_tokens": ("INT32", (1,)),
    "finish_reason": ("BYTES", (1,)),
    "conversation_id": ("BYTES", (1,)),
}
_IGNORED = frozenset({"end_id", "pad_id"})
# The ensemble's other inputs: (datatype, the values that change nothing; None: any).
_NEUTRAL: dict[str, tuple[str, frozenset[Any] | None]] = {
    "beam_width": ("INT32", frozenset({1})),
    "num_return_sequences": ("INT32", frozenset({1})),
    "min_tokens": ("INT32", frozenset({0})),
    "repetition_penalty": ("FP32", frozenset({1.0})),
    "length_penalty": ("FP32", frozenset({1.0})),
    "presence_penalty": ("FP32", frozenset({0.0})),
    "frequency_penalty": ("FP32", frozenset({0.0})),
    "return_log_probs": ("BOOL", frozenset({False})),
    "return_context_logits": ("BOOL", frozenset({False})),
    "return_generation_logits": ("BOOL", frozenset({False})),
    "return_perf_metrics": ("BOOL", frozenset({False})),
    "return_num_input_tokens": ("BOOL", None),
    "return_num_output_tokens": ("BOOL", None),
    "exclude_input_in_output": ("BOOL", None),
    "bad_words": ("BYTES", frozenset()),  # no element is neutral: only an empty list
}
_MAX_STOP_WORDS = 16
_FORMATS = {
    "BOOL": "?",
    "INT8": "b",
    "UINT8": "B",
    "INT16": "h",
    "UINT16": "H",
    "INT32": "i",
    "UINT32": "I",
    "INT64": "q",
    "UINT64": "Q",
    "FP32": "f",
    "FP64": "d",
}
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "INT64": "int64_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass(frozen=True, slots=True)
class InferTurn:
    """What one inference request asks for: a turn, and how to answer it."""

    turn: TurnRequest
    stream: bool
    outputs: frozenset[str]  # the outputs to send (all when the request names none)


def decode_tensor(tensor: Any, raw: bytes | None) -> list[Any]:
    """The elements of one input tensor (from ``raw`` when the request sent raw contents)."""
    datatype = tensor.datatype
    if any(d < 0 for d in tensor.shape):
        raise InvalidArgumentError(f"input {tensor.name!r} has a negative shape")
    count = math.prod(tensor.shape) if tensor.shape else 1
    if raw is None:
        field = _CONTENTS.get(datatype)
        if field is None:
            raise InvalidArgumentError(f"input {tensor.name!r}: datatype {datatype} is unknown")
        values = list(getattr(tensor.contents, field))
        if len(values) != count:
            raise InvalidArgumentError(
                f"input {tensor.name!r} holds {len(values)} values for shape {list(tensor.shape)}"
            )
        return values
    if datatype == "BYTES":
        return _split_bytes(tensor.name, raw, count)
    fmt = _FORMATS.get(datatype)
    if fmt is None:
        raise InvalidArgumentError(f"input {tensor.name!r}: datatype {datatype} is unknown")
    size = struct.calcsize(fmt)
    if len(raw) != count * size:
        raise InvalidArgumentError(
            f"input {tensor.name!r}: {len(raw)} bytes do not hold shape {list(tensor.shape)} "
            f"of {datatype}"
        )
    return list(struct.unpack(f"<{count}{fmt}", raw))


def _split_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    values: list[bytes] = []
    at = 0
    for _ in range(count):
        if at + 4 > len(raw):
            raise InvalidArgumentError(f"input {name!r}: its BYTES contents are cut short")
        (length,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + length > len(raw):
            raise InvalidArgumentError(f"input {name!r}: its BYTES contents are cut short")
        values.append(raw[at : at + length])
        at += length
    if at != len(raw):
        raise InvalidArgumentError(f"input {name!r}: its BYTES contents hold more than its shape")
    return values


def turn_of(request: Any) -> InferTurn:
    """The turn a ``ModelInferRequest`` asks for; InvalidArgumentError says what is wrong
    (the turn runner then checks the message and parameters against the limits)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError(
            "raw_input_contents must hold one entry per input (or be empty for all)"
        )
    values: dict[str, list[Any]] = {}
    for index, tensor in enumerate(request.inputs):
        neutral = _NEUTRAL.get(tensor.name)
        if neutral is not None:
            _check_neutral(tensor, raw[index] if raw else None, *neutral)
            continue
        spec = INPUTS.get(tensor.name)
        if spec is None:
            known = ", ".join(INPUTS)
            raise InvalidArgumentError(f"unexpected input {tensor.name!r}; inputs: {known}")
        if tensor.name in values:
            raise InvalidArgumentError(f"input {tensor.name!r} is given twice")
        if tensor.datatype != spec[0]:
            raise InvalidArgumentError(
                f"input {tensor.name!r} must be {spec[0]}, not {tensor.datatype}"
            )
        values[tensor.name] = decode_tensor(tensor, raw[index] if raw else None)
    if "text_input" not in values:
        raise InvalidArgumentError("input 'text_input' (BYTES, the user's message) is required")
    message = _text(_one(values, "text_input"), "text_input")
    stops = [_text(v, "stop_words") for v in values.get("stop_words", [])]
    stops = [s for s in stops if s]
    if len(stops) > _MAX_STOP_WORDS:
        raise InvalidArgumentError(f"at most {_MAX_STOP_WORDS} stop_words")
    for name in _IGNORED & values.keys():
        _one(values, name)  # still one value each
    if "seed" in values and "random_seed" in values:
        raise InvalidArgumentError("give seed or random_seed, not both")
    seed_name = "random_seed" if "random_seed" in values else "seed"
    seed = _one(values, seed_name) if seed_name in values else None
    params = TurnParams(
        temperature=float(_one(values, "temperature")) if "temperature" in values else 0.0,
        top_p=float(_one(values, "top_p")) if "top_p" in values else 1.0,
        top_k=int(_one(values, "top_k")) if "top_k" in values else 0,
        max_tokens=int(_one(values, "max_tokens")) if "max_tokens" in values else 0,
        stop=tuple(stops),
        seed=int(seed) if seed is not None else None,
    )
    conversation = request.parameters.get("conversation_id")
    conversation_id = conversation.string_param if conversation is not None else ""
    outputs = frozenset(o.name for o in request.outputs)
    unknown = outputs - OUTPUTS.keys()
    if unknown:
        raise InvalidArgumentError(
            f"unexpected output {sorted(unknown)[0]!r}; outputs: {', '.join(OUTPUTS)}"
        )
    return InferTurn(
        turn=TurnRequest(
            message=message,
            conversation_id=conversation_id,
            params=params,
            model=request.model_name,
        ),
        stream=bool(_one(values, "stream")) if "stream" in values else False,
        outputs=outputs or frozenset(OUTPUTS),
    )


def _check_neutral(
    tensor: Any, raw: bytes | None, datatype: str, allowed: frozenset[Any] | None
) -> None:
    if tensor.datatype != datatype:
        raise InvalidArgumentError(
            f"input {tensor.name!r} must be {datatype}, not {tensor.datatype}"
        )
    values = decode_tensor(tensor, raw)
    if allowed is None:
        return
    if any(v not in allowed for v in values):
        neutral = ", ".join(repr(v) for v in sorted(allowed)) or "empty"
        raise InvalidArgumentError(
            f"input {tensor.name!r} is not supported here beyond its neutral value ({neutral})"
        )


def _one(values: dict[str, list[Any]], name: str) -> Any:
    found = values[name]
    if len(found) != 1:
        raise InvalidArgumentError(f"input {name!r} must hold exactly one value")
    return found[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode()
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"input {name!r} is not valid UTF-8") from None


def bytes_tensor(values: Sequence[str]) -> tuple[str, list[int], bytes]:
    """A BYTES output with batch dimension 1: datatype, shape and raw contents."""
    parts = [s.encode() for s in values]
    raw = b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return "BYTES", [1, len(parts)], raw


def int32_tensor(value: int) -> tuple[str, list[int], bytes]:
    """An INT32 output of one value with batch dimension 1."""
    return scalar_tensor("INT32", value)


def scalar_tensor(datatype: str, value: float | bool) -> tuple[str, list[int], bytes]:
    """A tensor of one value (BOOL, INT32, UINT64, FP32, ...) with batch dimension 1."""
    return datatype, [1, 1], struct.pack(f"<{_FORMATS[datatype]}", value)
