"""Suspended principals are refused on every call, right after authentication.

An interceptor, not a turn policy, because a suspension stops every RPC of the
principal (listing conversations, AdminService, opening a Converse stream), not
only chat turns; it runs right after the interceptor that authenticates, so it
knows the caller, and before quotas, so a refused call counts against nothing.
A Converse stream opened before the suspension is stopped at its next turn by
:class:`~tokenwire.abuse.policy.AbusePolicy`.

The standing comes from the monitor's cache: a call costs a dictionary lookup
while it is fresh (``abuse.standing_cache_s``), one store read otherwise. Calls
that need no credentials (health checks, reflection) have no principal and pass.

    interceptors = [ErrorsInterceptor(), auth, SuspensionInterceptor(monitor), quotas]
"""

from __future__ import annotations

from typing import Any

import grpc

from tokenwire.abuse.monitor import AbuseMonitor
from tokenwire.abuse.refusals import AccountSuspendedError
from tokenwire.context import current_call
from tokenwire.interceptors.base import CallInfo, Interceptor, Proceed

__all__ = ["SuspensionInterceptor"]


class SuspensionInterceptor(Interceptor):
    """Refuses every call of a suspended principal with PERMISSION_DENIED and the reason."""

    def __init__(self, monitor: AbuseMonitor) -> None:
        self.monitor = monitor

    async def start(self) -> None:
        """Start the monitor (shared with the abuse policy; starting twice is harmless)."""
        await self.monitor.start()

    async def close(self) -> None:
        """Close the monitor (closing twice is harmless)."""
        await self.monitor.close()

    async def intercept(
        self,
        proceed: Proceed,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: CallInfo,
    ) -> Any:
        principal = current_call().principal
        if principal is not None:
            standing = self.monitor.cached(principal)  # no await while the cache is fresh
            if standing is None:
                standing = await self.monitor.standing(principal)
            if standing.suspended:
                raise AccountSuspendedError(standing)
        return await proceed(request, context)
