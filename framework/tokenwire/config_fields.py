"""The one way a configuration field is declared: a default and a one-line description.

Every section (``ServerConfig``, ``AuthConfig``, ``QuotaConfig``...) uses it, so
``tokenwire serve --help-config`` can list every field with its help text.

    listen: str = setting("127.0.0.1:50051", "HOST:PORT to listen on")
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

from tokenwire.errors import ConfigError

__all__ = ["parse_pairs", "require_positive", "setting"]


def setting(default: Any, help: str) -> Any:
    """A dataclass field with ``default`` whose description is ``help``."""
    return field(default=default, metadata={"help": help})


def parse_pairs(text: str, where: str, example: str = "key=value,key=value") -> dict[str, str]:
    """``"a=1, b=2"`` → ``{"a": "1", "b": "2"}``: the environment's form of a table."""
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ConfigError(f"{where}: expected {example!r}, got {text!r}")
    return {key.strip(): value.strip() for key, value in pairs}


def require_positive(section: str, config: object, *names: str) -> None:
    """ConfigError unless each field ``names`` of ``config`` is a positive, finite number."""
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{section}.{name} must be a positive number, got {value!r}")
