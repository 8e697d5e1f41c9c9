"""Picking the next token from logits: greedy, temperature, top-k and top-p.

The order matches transformers' own processors (temperature, then top-k, then
top-p), so a seeded request behaves like ``model.generate(do_sample=True)`` with
the same settings in spirit, though not bit for bit.
"""

from __future__ import annotations

import torch

from tokenwire.backend import SamplingParams

__all__ = ["sample_next_token"]


def sample_next_token(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> int:
    """Pick one token id from a 1-D tensor of logits.

    ``temperature <= 0`` is greedy (argmax, no randomness). Otherwise the logits
    are divided by the temperature, cut to the ``top_k`` best (0: no cut) and to
    the smallest set whose probability reaches ``top_p`` (1.0 or 0: no cut), and
    one token is drawn with ``generator``::

        sample_next_token(torch.tensor([0.1, 2.0, 0.3]), SamplingParams(), None)  # 1
    """
    if sampling.temperature <= 0:
        return int(torch.argmax(logits).item())
    scores = logits.float() / sampling.temperature
    vocab = scores.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_best = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if 0 < sampling.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token once the tokens ranked above it reach top_p, as transformers does; the
        # best token is never dropped, so at least one always remains.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = torch.zeros_like(scores, dtype=torch.bool)
        drop[order] = mass_before >= sampling.top_p
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
