"""Per-call metrics: open streams by method, and calls refused before their handler.

Placed right after the errors interceptor, so it sees what authentication and the
call-level quotas refuse (the per-turn ones are :class:`MetricsPolicy`'s)."""

from __future__ import annotations

from typing import Any

import grpc

from tokenwire.errors import TokenwireError
from tokenwire.interceptors.base import CallInfo, Interceptor, Proceed
from tokenwire.metrics.policy import quotas_of
from tokenwire.metrics.registry import Metrics

__all__ = ["MetricsInterceptor"]


def _decrement(gauge: Any) -> Any:
    def done(_context: object) -> None:
        gauge.dec()

    return done


class MetricsInterceptor(Interceptor):
    """Counts open streams and refused calls; nothing per message."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        if call.response_streaming or call.request_streaming:
            gauge = self.metrics.active_streams.labels(call.method)
            gauge.inc()
            # The end of the RPC, however it ends: no step of ours per message.
            context.add_done_callback(_decrement(gauge))
        try:
            return await proceed(request, context)
        except TokenwireError as exc:
            for quota in quotas_of(exc) or [""]:
                self.metrics.refusals.labels(call.method, exc.code.name, quota).inc()
            raise
