"""``ClassifierModerator``: a classifier trained on sentence embeddings of labelled turns.

It embeds text with the shared all-MiniLM-L6-v2 model (:mod:`.embedder`; the
layers the file names, each mean-pooled) and applies a softmax regression over
``safe`` and the abuse categories, trained on the development part of the
labelled set in ``benchmarks/moderation_data`` by
``scripts/train_moderation_classifier.py`` and shipped as a small JSON file
(``data/classifier.json``: the labels, one weight row per label, the threshold
and a hash of the data it was trained on). Text is flagged when the probability
that it is *not* safe reaches ``threshold``; the category is the likeliest
unsafe label.

Obfuscation is undone before embedding (look-alike letters folded as the rules
do, digits inside words read as letters, spaced-out letters joined), and a
message is scored as a whole and sentence by sentence, flagged on the worst.

    moderator = ClassifierModerator()
    await moderator.start()                             # loads on its own thread
    (await moderator.check("h0w do i cook m3th at home")).category   # "drugs"

Like the embedding moderator it runs on one worker thread of its own (about
10-30 ms for a sentence on a laptop CPU); the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenwire.errors import ConfigError, InternalError
from tokenwire.moderation.base import CLEAN, Verdict
from tokenwire.moderation.embedder import (
    embed_layers,
    load_embedding_model,
    model_dir,
    split_pieces,
)
from tokenwire.moderation.rules import fold

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_WEIGHTS", "SAFE_LABEL", "ClassifierModerator", "deobfuscate", "load_weights"]

DEFAULT_WEIGHTS = Path(__file__).with_name("data") / "classifier.json"
SAFE_LABEL = "safe"

_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b",
                       "@": "a", "$": "s", "!": "i", "|": "l"})  # fmt: skip
_MIXED = re.compile(r"\S*[a-z]\S*")  # a word with letters (leet only inside words)
_SPACED = re.compile(r"\b\w([ .\-_*])(?:\w\1)+\w\b")  # "b o m b", "k.i.l.l": one separator
_SPACES = re.compile(r"\s+")


def deobfuscate(text: str) -> str:
    """The plain words behind common obfuscation: look-alikes, leet, spaced letters."""
    text = _SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group()), text)
    skeleton = fold(text)
    skeleton = _MIXED.sub(lambda m: m.group().translate(_LEET), skeleton)
    return _SPACES.sub(" ", skeleton).strip()


@dataclass(frozen=True, slots=True)
class _Weights:
    labels: tuple[str, ...]
    weight: torch.Tensor  # [labels, dim]
    bias: torch.Tensor  # [labels]
    threshold: float
    layers: tuple[int, ...]  # the embedding model's layers the features pool


def load_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The classifier file: ``labels``, ``weights`` (rows), ``bias``, ``threshold``."""
    where = os.fspath(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the moderation classifier {where!r}: {exc}") from exc
    labels, weights, bias = data.get("labels"), data.get("weights"), data.get("bias")
    if (
        not isinstance(labels, list)
        or SAFE_LABEL not in labels
        or not isinstance(weights, list)
        or not isinstance(bias, list)
        or len(weights) != len(labels)
        or len(bias) != len(labels)
        or len({len(row) for row in weights}) != 1
    ):
        raise ConfigError(
            f"{where}: a classifier file holds labels (with 'safe'), one weight row and one "
            "bias per label, all rows of one length"
        )
    return dict(data)


class ClassifierModerator:
    """A softmax regression on sentence embeddings; see the module docstring.

    ``threshold`` (probability of not-safe) overrides the file's own; ``num_threads``
    bounds torch's threads on the moderator's worker thread.
    """

    name = "classifier"

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        *,
        threshold: float | None = None,
        model_path: str | os.PathLike[str] | None = None,
        max_piece_chars: int = 500,
        num_threads: int | None = 1,
    ) -> None:
        self._weights_path = Path(weights_path) if weights_path else DEFAULT_WEIGHTS
        self._data = load_weights(self._weights_path)
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ConfigError(f"the classifier's threshold is a probability in (0, 1): {threshold}")
        self.threshold = float(threshold if threshold is not None else self._data["threshold"])
        self.categories = tuple(label for label in self._data["labels"] if label != SAFE_LABEL)
        self._model_path = model_path
        self._max_piece_chars = max_piece_chars
        self._num_threads = num_threads
        self._executor: ThreadPoolExecutor | None = None
        self._loaded: tuple[Any, Any, _Weights] | None = None

    async def start(self) -> None:
        """Load the embedding model and the weights, on the moderator's worker thread."""
        if self._loaded is not None:
            return
        path = Path(self._model_path) if self._model_path is not None else model_dir()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="tokenwire-classifier")
        loop = asyncio.get_running_loop()
        self._loaded = await loop.run_in_executor(self._executor, self._load, path)

    async def close(self) -> None:
        """Release the model and its thread."""
        executor, self._executor, self._loaded = self._executor, None, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def check(self, text: str) -> Verdict:
        """Flagged when the worst of the whole text and its sentences is likely unsafe."""
        if self._loaded is None or self._executor is None:
            raise InternalError("the classifier moderator was used before start()")
        pieces = self.pieces(text)
        if not pieces:
            return CLEAN
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._classify, pieces)

    def pieces(self, text: str) -> list[str]:
        """What is embedded: the text and its sentences, plain and de-obfuscated."""
        sentences = split_pieces(text, self._max_piece_chars)
        if not sentences:
            return []
        whole = [text.strip()[: self._max_piece_chars * 2]] if len(sentences) > 1 else []
        out: list[str] = []
        for piece in (*whole, *sentences):
            out.append(piece)
            plain = deobfuscate(piece)
            # Only text that was obfuscated is embedded twice (folding alone changes little).
            if plain and plain != _SPACES.sub(" ", fold(piece)).strip():
                out.append(plain)
        return out

    def scores(self, texts: list[str]) -> torch.Tensor:
        """Label probabilities, ``[texts, labels]`` (on the calling thread; for the benchmark)."""
        assert self._loaded is not None, "start() first"
        tokenizer, model, weights = self._loaded
        vectors = embed_layers(tokenizer, model, texts, weights.layers)
        logits = vectors @ weights.weight.T + weights.bias
        return logits.softmax(dim=-1)

    def _load(self, path: Path) -> tuple[Any, Any, _Weights]:
        import torch

        tokenizer, model = load_embedding_model(path, self._num_threads)
        data = self._data
        weights = _Weights(
            tuple(data["labels"]),
            torch.tensor(data["weights"], dtype=torch.float32),
            torch.tensor(data["bias"], dtype=torch.float32),
            self.threshold,
            tuple(int(layer) for layer in data.get("layers", (model.config.num_hidden_layers,))),
        )
        dim = int(model.config.hidden_size) * len(weights.layers)
        if weights.weight.shape[1] != dim:
            raise ConfigError(
                f"{self._weights_path}: weights of width {weights.weight.shape[1]} do not fit "
                f"the embedding model's {dim}"
            )
        return tokenizer, model, weights

    def _classify(self, pieces: list[str]) -> Verdict:
        assert self._loaded is not None
        labels = self._loaded[2].labels
        safe = labels.index(SAFE_LABEL)
        probabilities = self.scores(pieces)  # [pieces, labels]
        unsafe = 1.0 - probabilities[:, safe]
        worst = int(unsafe.argmax())
        score = float(unsafe[worst])
        if score < self.threshold:
            return Verdict(False, "", score)
        row = probabilities[worst].clone()
        row[safe] = -1.0
        return Verdict(True, labels[int(row.argmax())], score)
