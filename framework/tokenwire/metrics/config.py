"""The ``[metrics]`` section: Prometheus metrics on an HTTP port of their own."""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire.config_fields import setting
from tokenwire.errors import ConfigError

__all__ = ["MetricsConfig"]


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics, served by gateways and workers alike."""

    enabled: bool = setting(False, "serve Prometheus metrics on listen (text format, /metrics)")
    listen: str = setting(
        "127.0.0.1:9464", "HOST:PORT of the metrics endpoint; port 0 picks a free port"
    )
    tenant_labels: int = setting(
        100,
        "most distinct tenants that get a label of their own; later ones count as 'other' "
        "(user and conversation ids are never labels)",
    )

    def __post_init__(self) -> None:
        if ":" not in self.listen:
            raise ConfigError(f"metrics.listen must be HOST:PORT, got {self.listen!r}")
        if self.tenant_labels < 0:
            raise ConfigError("metrics.tenant_labels must be >= 0")
