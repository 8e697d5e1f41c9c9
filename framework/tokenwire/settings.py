"""The one way a configuration field is declared: a default and a one-line description.

Every section (``ServerConfig``, ``AuthConfig``, ``QuotaConfig``...) uses it, so
``tokenwire serve --help-config`` can list every field with its help text.

    listen: str = setting("127.0.0.1:50051", "HOST:PORT to listen on")
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["setting"]


def setting(default: Any, help: str) -> Any:
    """A dataclass field with ``default`` whose description is ``help``."""
    return field(default=default, metadata={"help": help})
