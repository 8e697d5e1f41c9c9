"""The ``[usage]`` section: token accounting, prices and budgets."""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire.config_fields import setting

__all__ = ["UsageConfig"]


@dataclass(frozen=True, slots=True)
class UsageConfig:
    """Every turn's tokens recorded per tenant, user, key and model; costs and budgets."""

    enabled: bool = setting(True, "record every turn's tokens in the conversation database")
