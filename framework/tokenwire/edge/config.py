"""The ``[http]`` section: the web edge (OpenAI-compatible HTTP, browsers, the chat page)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire.config_fields import setting
from tokenwire.errors import ConfigError

__all__ = ["HttpConfig"]


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """HTTP on a port of its own, through the same admission as the gRPC API."""

    enabled: bool = setting(
        False, "serve the OpenAI-compatible API, browsers' Connect/gRPC-Web and the chat page"
    )
    listen: str = setting("127.0.0.1:8080", "HOST:PORT of the HTTP edge; port 0 picks one")
    cors_origins: str = setting(
        "", "comma-separated origins browsers may call from (another site's page); empty: none"
    )
    chat_page: bool = setting(True, "serve the chat page at / (sign in with an API key)")
    max_body_bytes: int = setting(1 << 20, "largest request body accepted (bigger: 413)")

    def __post_init__(self) -> None:
        if ":" not in self.listen:
            raise ConfigError(f"http.listen must be HOST:PORT, got {self.listen!r}")
        if self.max_body_bytes < 1024:
            raise ConfigError("http.max_body_bytes must be at least 1024")
