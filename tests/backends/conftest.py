"""Helpers for the torch backend's tests: small random Llama models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokenwire_torch.llama import cpu_has_fbgemm

needs_fbgemm = pytest.mark.skipif(not cpu_has_fbgemm(), reason="needs fbgemm (x86 with AVX2)")
"""Marks a test of the fp16 weights (fbgemm's kernels): skipped where they cannot run."""


def tiny_llama(*, seed: int | None = None, eos: bool = True, **sizes: Any) -> Any:
    """A random small Llama with grouped-query attention (4 query heads, 2 key/value
    heads), in float32 and eval mode. ``sizes`` override the config's fields (width,
    layers, vocabulary, ...); ``eos=False`` drops the BOS, EOS and pad ids, so it never
    ends early; ``seed`` seeds torch before the weights are drawn."""
    fields: dict[str, Any] = {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **sizes,
    }
    if not eos:
        fields |= {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()
