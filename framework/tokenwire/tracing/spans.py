"""OpenTelemetry spans of a turn: gateway, router, worker and engine, one trace.

With ``tracing.enabled`` each process builds a :class:`Tracing`: a tracer
provider of its own (service name from config, parent-based sampling at
``sample_ratio``) exporting to ``otlp_endpoint`` over OTLP/gRPC in batches. The
trace context travels as W3C ``traceparent`` call metadata: the turn runner puts
its span's context on the engine request (:attr:`GenerateRequest.trace_metadata`),
the router starts its span from it and hands its own to the worker, whose span
(and its engine span) continue the same trace. Log lines of a traced turn carry
its ``trace_id``.

    tracing = Tracing.from_config(config.tracing)       # None when off
    span = tracing.start("tokenwire.turn", parent=())  # a root span
    metadata = tracing.inject(span)                     # (("traceparent", "00-..."),)

OpenTelemetry (the ``tracing`` extra) is imported only when tracing is on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenwire.errors import ConfigError
from tokenwire.tracing.config import TracingConfig

__all__ = ["Metadata", "Tracing", "trace_id_of"]

Metadata = tuple[tuple[str, str], ...]
_KEYS = ("traceparent", "tracestate")


class Tracing:
    """Starts spans with parents from call metadata and writes span contexts into it."""

    def __init__(self, config: TracingConfig, *, exporter: Any = None, batch: bool = False) -> None:
        """``exporter`` (an OpenTelemetry SpanExporter) replaces the OTLP one, exported
        span by span (tests use an in-memory exporter), or in batches as the OTLP one
        is with ``batch``."""
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:
            raise ConfigError(
                f"tracing.enabled needs OpenTelemetry ({exc}); "
                "install its extra: pip install 'tokenwire[tracing]'"
            ) from exc
        self.config = config
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            endpoint = config.otlp_endpoint
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http:"))
            self._provider.add_span_processor(BatchSpanProcessor(exporter))
        else:
            processor = BatchSpanProcessor if batch else SimpleSpanProcessor
            self._provider.add_span_processor(processor(exporter))
        self._tracer = self._provider.get_tracer("tokenwire")
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_config(cls, config: TracingConfig) -> Tracing | None:
        """A Tracing for ``config``, or None when tracing is off."""
        return cls(config) if config.enabled else None

    def start(
        self,
        name: str,
        parent: Sequence[tuple[str, str | bytes]] = (),
        attributes: Mapping[str, Any] | None = None,
    ) -> Any:
        """A started span, child of the context in ``parent`` (call metadata), if any."""
        carrier = {k: v if isinstance(v, str) else v.decode() for k, v in parent if k in _KEYS}
        context = self._propagator.extract(carrier) if carrier else None
        return self._tracer.start_span(name, context=context, attributes=dict(attributes or {}))

    def inject(self, span: Any) -> Metadata:
        """``span``'s context as call metadata (``traceparent``, ``tracestate``)."""
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return tuple(sorted(carrier.items()))

    def close(self) -> None:
        """Export what is still buffered and stop."""
        self._provider.shutdown()


def trace_id_of(span: Any) -> str:
    """The span's trace id as 32 hex digits (for log lines)."""
    return f"{span.get_span_context().trace_id:032x}"
