"""structlog set-up: JSON or console, with the call's request id on every line.

The errors interceptor binds ``request_id`` and ``method`` with
``structlog.contextvars``; every log line made while serving that call carries them.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import structlog

from tokenwire.errors import ConfigError

if TYPE_CHECKING:  # config imports modules that log
    from tokenwire.config import LoggingConfig

__all__ = ["configure_logging", "get_logger"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def configure_logging(config: LoggingConfig) -> None:
    """Install the structlog pipeline once, at start-up."""
    if config.level not in _LEVELS:
        raise ConfigError(
            f"logging.level must be one of {', '.join(_LEVELS)}, got {config.level!r}"
        )
    if config.format not in ("console", "json"):
        raise ConfigError(f"logging.format must be 'console' or 'json', got {config.format!r}")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if config.format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([structlog.processors.format_exc_info] if config.format == "json" else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[config.level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger tagged with the emitting module."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(logger_name=name)
    return logger
