"""The torch side of the engine: loading a model and running one step of one sequence.

This module imports torch and transformers at the top, so the engine imports it
only inside ``start()``. Everything here runs on the engine's single worker
thread; nothing here touches the event loop.
"""

from __future__ import annotations

import gc
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from tokenwire.backend import SamplingParams
from tokenwire.errors import ConfigError
from tokenwire_torch.sampling import sample_next_token
from tokenwire_torch.source import ModelSource

__all__ = ["DecodeState", "ModelRunner", "choose_device", "choose_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_device(name: str) -> torch.device:
    """Map the configured device ("auto", "cpu", "cuda", "cuda:1", ...) to a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"invalid device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available to torch")
    return device


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map the configured dtype to a torch dtype; "auto" picks what the device runs well."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Half precision on CPU is slower than float32 for a model this small, and
    # GGUF weights are de-quantized to float32 anyway.
    return torch.float32


@dataclass(eq=False)
class DecodeState:
    """One sequence's torch-side state: its KV cache, its RNG and the token to feed next.

    Dropping the last reference to a state frees its KV cache.
    """

    prompt: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None
    cache: DynamicCache | None = None
    next_input: list[int] = field(default_factory=list)


class ModelRunner:
    """A loaded causal LM that prefills and decodes one sequence at a time.

    Batching several sequences into one forward pass would replace ``step`` with
    a step over a list of states; the engine already hands states over opaquely.
    """

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        config = model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.eos_token_ids = _eos_token_ids(model)
        # transformers 5 renamed ``past_key_values`` to ``cache`` (older 5.x still
        # takes the old name, and an unknown keyword would be swallowed silently
        # into **kwargs, disabling the cache), so ask the signature once.
        parameters = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._keep_last_logits = "logits_to_keep" in parameters

    @classmethod
    def load(
        cls,
        source: ModelSource,
        device_name: str,
        dtype_name: str,
        *,
        num_threads: int | None = None,
    ) -> ModelRunner:
        """Load ``source`` onto the configured device in the configured dtype (blocking).

        ``num_threads`` sets torch's intra-op threads (None: torch's default, one
        per core). It is set here, on the thread that will run every step, because
        OpenMP keeps the setting per thread; threads started later inherit it. On
        a CPU shared with other busy processes fewer threads decode faster: a
        spinning thread team stalls whenever one of its cores is taken away.
        """
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        device = choose_device(device_name)
        dtype = choose_dtype(dtype_name, device)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if source.gguf_file is not None:
            kwargs["gguf_file"] = source.gguf_file
        # Typed as Any: transformers' stubs do not cover the model methods used here.
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(source.directory), local_files_only=True, **kwargs
        )
        model.to(device)
        model.eval()
        return cls(model, device)

    def new_state(self, prompt: list[int], sampling: SamplingParams) -> DecodeState:
        """Create a sequence's state; the RNG is seeded from ``sampling.seed`` (None: random)."""
        generator: torch.Generator | None = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
        return DecodeState(prompt=prompt, sampling=sampling, generator=generator)

    def step(self, state: DecodeState) -> int:
        """Run one forward pass for ``state`` and return the next token id.

        The first call prefills the whole prompt; later calls feed the token the
        previous call returned. The KV cache grows in place.
        """
        with torch.inference_mode():
            if state.cache is None:
                state.cache = DynamicCache(config=self.model.config)
                input_ids = state.prompt
            else:
                input_ids = state.next_input
            kwargs: dict[str, Any] = {self._cache_kwarg: state.cache, "use_cache": True}
            if self._keep_last_logits:
                kwargs["logits_to_keep"] = 1
            inputs = torch.tensor([input_ids], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=inputs, **kwargs).logits[0, -1, :]
            token = sample_next_token(logits, state.sampling, state.generator)
        state.next_input = [token]
        return token

    def close(self) -> None:
        """Drop the model and give cached accelerator memory back."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _eos_token_ids(model: Any) -> frozenset[int]:
    """Collect the end-of-sequence ids from the generation config, else the model config."""
    found: set[int] = set()
    for config in (getattr(model, "generation_config", None), model.config):
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, int):
            found.add(eos)
        elif isinstance(eos, list | tuple):
            found.update(int(token) for token in eos)
        if found:
            break
    return frozenset(found)
