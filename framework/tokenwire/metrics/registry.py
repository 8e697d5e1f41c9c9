"""The metrics themselves: one object per process holding every Prometheus metric.

Names and labels (label values are bounded: models, workers and methods are few,
tenants are capped at ``metrics.tenant_labels`` and the rest count as ``other``;
user and conversation ids are never labels):

=========================================  ==========  ===================================
metric                                     type        labels
=========================================  ==========  ===================================
tokenwire_turns_total                      counter     model, tenant, ending
tokenwire_prompt_tokens_total              counter     model, tenant
tokenwire_completion_tokens_total          counter     model, tenant
tokenwire_time_to_first_token_seconds      histogram   model
tokenwire_time_per_output_token_seconds    histogram   model
tokenwire_turn_duration_seconds            histogram   model, ending
tokenwire_active_streams                   gauge       method
tokenwire_refusals_total                   counter     method, code, quota
tokenwire_quota_refusals_total             counter     tenant, quota
tokenwire_moderation_blocks_total          counter     category, direction
tokenwire_engine_running_requests          gauge       worker
tokenwire_engine_queued_requests           gauge       worker
tokenwire_engine_queued_tokens             gauge       worker
tokenwire_engine_kv_cache_usage            gauge       worker
tokenwire_engine_tokens_per_second         gauge       worker
tokenwire_prefix_cache_hit_rate            gauge       worker
tokenwire_router_decisions_total           counter     worker
tokenwire_router_retries_total             counter     worker
tokenwire_router_ejections_total           counter     worker
tokenwire_worker_requests_total            counter     finish_reason
=========================================  ==========  ===================================

``ending`` is how a turn ended: ``stop``, ``length``, ``cancelled``,
``content_filter`` (the answer was cut), ``refused`` (before it started: quotas,
input moderation, capacity) or ``error``. ``worker`` is ``local`` for the engine
in this process, else the worker's address.

With several gateway processes (``tokenwire serve --processes N``) every process
writes to ``PROMETHEUS_MULTIPROC_DIR`` and the first one serves the sum: counters
and histograms add up, stream gauges sum over live processes, engine gauges take
the largest value (every process sees the same workers).

prometheus_client is imported when metrics are first built, so that the
multiprocess directory can be set before.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Metrics", "RouterEvents"]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OTHER = "other"


class Metrics:
    """Every metric of one process, registered in ``registry`` (the default: a new one)."""

    def __init__(self, *, tenant_labels: int = 100, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._tenant_limit = tenant_labels
        self._tenants: set[str] = set()
        self.turns = Counter(
            "tokenwire_turns", "Chat turns by how they ended", ["model", "tenant", "ending"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "tokenwire_prompt_tokens", "Prompt tokens of turns the engine ran",
            ["model", "tenant"], registry=r,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "tokenwire_completion_tokens", "Completion tokens generated",
            ["model", "tenant"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "tokenwire_time_to_first_token_seconds",
            "From the request to the first answer text sent", ["model"],
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "tokenwire_time_per_output_token_seconds",
            "From the first to the last answer text, per token after the first", ["model"],
            buckets=_TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "tokenwire_turn_duration_seconds", "Whole turns, admission to the end",
            ["model", "ending"], buckets=_DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.active_streams = Gauge(
            "tokenwire_active_streams", "Streaming calls open now (Converse sessions too)",
            ["method"], registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.refusals = Counter(
            "tokenwire_refusals", "Calls refused before their handler ran, by status",
            ["method", "code", "quota"], registry=r,
        )  # fmt: skip
        self.quota_refusals = Counter(
            "tokenwire_quota_refusals", "Calls and turns refused by a quota",
            ["tenant", "quota"], registry=r,
        )  # fmt: skip
        self.moderation_blocks = Counter(
            "tokenwire_moderation_blocks", "Messages refused and answers cut by moderation",
            ["category", "direction"], registry=r,
        )  # fmt: skip
        engine: dict[str, Any] = {"registry": r, "multiprocess_mode": "max"}
        self.engine_running = Gauge(
            "tokenwire_engine_running_requests", "Requests generating (the batch)",
            ["worker"], **engine,
        )  # fmt: skip
        self.engine_queued = Gauge(
            "tokenwire_engine_queued_requests", "Requests waiting for a place", ["worker"],
            **engine,
        )  # fmt: skip
        self.engine_queued_tokens = Gauge(
            "tokenwire_engine_queued_tokens", "Prompt tokens waiting for prefill", ["worker"],
            **engine,
        )  # fmt: skip
        self.engine_kv = Gauge(
            "tokenwire_engine_kv_cache_usage", "KV cache in use, 0..1", ["worker"], **engine
        )
        self.engine_tps = Gauge(
            "tokenwire_engine_tokens_per_second", "Recent decode throughput", ["worker"],
            **engine,
        )  # fmt: skip
        self.prefix_hit_rate = Gauge(
            "tokenwire_prefix_cache_hit_rate",
            "Share of prompt tokens served from the prefix cache", ["worker"], **engine,
        )  # fmt: skip
        self.router_decisions = Counter(
            "tokenwire_router_decisions", "Turns the router sent to each worker", ["worker"],
            registry=r,
        )  # fmt: skip
        self.router_retries = Counter(
            "tokenwire_router_retries", "Turns retried elsewhere after a worker failed",
            ["worker"], registry=r,
        )  # fmt: skip
        self.router_ejections = Counter(
            "tokenwire_router_ejections", "Times a worker was taken out of rotation",
            ["worker"], registry=r,
        )  # fmt: skip
        self.worker_requests = Counter(
            "tokenwire_worker_requests", "Generate requests a worker served, by finish reason",
            ["finish_reason"], registry=r,
        )  # fmt: skip

    def tenant(self, name: str) -> str:
        """``name`` as a label value: the first ``tenant_labels`` tenants, then ``other``."""
        if name in self._tenants:
            return name
        if len(self._tenants) < self._tenant_limit:
            self._tenants.add(name)
            return name
        return OTHER

    def router_events(self) -> RouterEvents:
        """What the router reports as it decides, retries and ejects."""
        return RouterEvents(self)


class RouterEvents:
    """The router's events as counters (handed to the router explicitly)."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def decided(self, worker: str) -> None:
        self._metrics.router_decisions.labels(worker).inc()

    def retried(self, worker: str) -> None:
        self._metrics.router_retries.labels(worker).inc()

    def ejected(self, worker: str) -> None:
        self._metrics.router_ejections.labels(worker).inc()
