"""The ``[tracing]`` section: OpenTelemetry traces, off by default."""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire.config_fields import setting
from tokenwire.errors import ConfigError

__all__ = ["TracingConfig"]


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry tracing of turns across gateway, router, worker and engine."""

    enabled: bool = setting(False, "record spans and send them to otlp_endpoint")
    otlp_endpoint: str = setting(
        "http://127.0.0.1:4317", "OTLP/gRPC collector the spans are exported to"
    )
    service_name: str = setting("tokenwire", "service.name of this process's spans")
    sample_ratio: float = setting(
        1.0, "share of new traces recorded, 0..1 (parents decide for children)"
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError(f"tracing.sample_ratio must be within 0..1, got {self.sample_ratio}")
