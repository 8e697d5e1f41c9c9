"""The Triton backend's settings, read from ``backend.options`` (``key=value,key=value``).

==========================  ===========  ================================================
option                      default      meaning
==========================  ===========  ================================================
``url``                     (required)   HOST:PORT of Triton's gRPC endpoint
``model``                   ``ensemble`` the Triton model: TensorRT-LLM's ``ensemble`` or
                                         ``tensorrt_llm_bls``
``output``                  ``delta``    ``delta``: each response holds new text (the
                                         ensemble); ``cumulative``: the whole text so far
                                         (BLS with ``accumulate_tokens``)
``prompt``                  ``plain``    how messages become ``text_input``: ``plain``
                                         (``role: content`` lines, then ``assistant:``),
                                         ``last_message`` (a server that templates and
                                         keeps history itself) or ``chat_template`` (the
                                         template of the tokenizer at ``tokenizer``)
``tokenizer``               (none)       a transformers tokenizer directory, for
                                         ``prompt=chat_template``
``context_length``          ``4096``     the model's context, in tokens
``max_batch``               ``64``       requests this gateway sends at once
``end_id`` ``pad_id``       (none)       sent as ``end_id`` / ``pad_id`` when set
``token``                   (none)       sent as ``authorization: Bearer TOKEN``
``tls_ca_file``             (none)       PEM CA of the server's certificate; set: TLS
``stats_interval_s``        ``1.0``      how often Triton's statistics are read for load
``timeout_s``               ``10.0``     limit on each control call (ready, statistics)
``name.<tensor>``           the tensor   another name for one of the tensors (e.g.
                                         ``name.seed=random_seed`` for older ensembles)
                                         ``text_input``, ``text_output``, ``max_tokens``,
                                         ``stream``, ``temperature``, ``top_p``, ``top_k``,
                                         ``seed``, ``stop_words``, ``end_id``, ``pad_id``
==========================  ===========  ================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tokenwire.errors import ConfigError

__all__ = ["TENSORS", "TritonOptions"]

TENSORS = (
    "text_input",
    "text_output",
    "max_tokens",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop_words",
    "end_id",
    "pad_id",
)
_KEYS = {
    "url",
    "model",
    "output",
    "prompt",
    "tokenizer",
    "context_length",
    "max_batch",
    "end_id",
    "pad_id",
    "token",
    "tls_ca_file",
    "stats_interval_s",
    "timeout_s",
}
_EXAMPLE = "backend.options = 'url=triton:8001,model=ensemble'"


@dataclass(frozen=True, slots=True)
class TritonOptions:
    """Validated ``backend.options`` of the Triton backend."""

    url: str
    model: str = "ensemble"
    output: str = "delta"
    prompt: str = "plain"
    tokenizer: str = ""
    context_length: int = 4096
    max_batch: int = 64
    end_id: int | None = None
    pad_id: int | None = None
    token: str = ""
    tls_ca_file: str = ""
    stats_interval_s: float = 1.0
    timeout_s: float = 10.0
    names: Mapping[str, str] = field(default_factory=dict)

    def name(self, tensor: str) -> str:
        """The model's name for ``tensor``."""
        return self.names.get(tensor, tensor)

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> TritonOptions:
        """Options from ``backend.options``; ConfigError names what is wrong, with an example."""
        names: dict[str, str] = {}
        values: dict[str, str] = {}
        for key, value in options.items():
            if key.startswith("name."):
                tensor = key.removeprefix("name.")
                if tensor not in TENSORS or not value:
                    raise ConfigError(
                        f"backend.options {key!r}: tensors that can be renamed: "
                        f"{', '.join(TENSORS)}"
                    )
                names[tensor] = value
            elif key in _KEYS:
                values[key] = value
            else:
                raise ConfigError(
                    f"backend.options: unknown Triton option {key!r}; known: "
                    f"{', '.join(sorted(_KEYS))}, name.<tensor> (e.g. {_EXAMPLE})"
                )
        url = values.get("url", "")
        if not url or ":" not in url:
            raise ConfigError(f"the Triton backend needs url=HOST:PORT, e.g. {_EXAMPLE}")
        parsed = cls(
            url=url,
            model=values.get("model", "ensemble"),
            output=values.get("output", "delta"),
            prompt=values.get("prompt", "plain"),
            tokenizer=values.get("tokenizer", ""),
            context_length=_int(values, "context_length", 4096),
            max_batch=_int(values, "max_batch", 64),
            end_id=_int(values, "end_id", 0) if "end_id" in values else None,
            pad_id=_int(values, "pad_id", 0) if "pad_id" in values else None,
            token=values.get("token", ""),
            tls_ca_file=values.get("tls_ca_file", ""),
            stats_interval_s=_float(values, "stats_interval_s", 1.0),
            timeout_s=_float(values, "timeout_s", 10.0),
            names=names,
        )
        if parsed.output not in ("delta", "cumulative"):
            raise ConfigError("backend.options output must be delta or cumulative")
        if parsed.prompt not in ("plain", "last_message", "chat_template"):
            raise ConfigError("backend.options prompt must be plain, last_message or chat_template")
        if parsed.prompt == "chat_template" and not parsed.tokenizer:
            raise ConfigError("backend.options prompt=chat_template needs tokenizer=DIRECTORY")
        if parsed.context_length < 1 or parsed.max_batch < 1:
            raise ConfigError("backend.options context_length and max_batch must be >= 1")
        if not (parsed.stats_interval_s > 0 and parsed.timeout_s > 0):
            raise ConfigError("backend.options stats_interval_s and timeout_s must be > 0")
        return parsed


def _int(values: Mapping[str, str], key: str, default: int) -> int:
    if key not in values:
        return default
    try:
        return int(values[key])
    except ValueError:
        raise ConfigError(
            f"backend.options {key} must be an integer, got {values[key]!r}"
        ) from None


def _float(values: Mapping[str, str], key: str, default: float) -> float:
    if key not in values:
        return default
    try:
        return float(values[key])
    except ValueError:
        raise ConfigError(f"backend.options {key} must be a number, got {values[key]!r}") from None
