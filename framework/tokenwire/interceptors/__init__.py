"""Interceptors around every RPC, and the one place their order is declared.

Order, outermost first: errors + logging → auth → quotas → moderation.
"""

from __future__ import annotations

from tokenwire.config import Config
from tokenwire.interceptors.base import CallInfo, Interceptor, InterceptorChain, Proceed
from tokenwire.interceptors.errors import REQUEST_ID_HEADER, ErrorsInterceptor

__all__ = [
    "REQUEST_ID_HEADER",
    "CallInfo",
    "ErrorsInterceptor",
    "Interceptor",
    "InterceptorChain",
    "Proceed",
    "default_interceptors",
]


def default_interceptors(config: Config) -> list[Interceptor]:
    """The interceptor chain the server runs, outermost first."""
    from tokenwire.interceptors.auth import AuthInterceptor
    from tokenwire.interceptors.moderation import ModerationInterceptor
    from tokenwire.interceptors.quotas import QuotaInterceptor

    chain: list[Interceptor] = [ErrorsInterceptor()]
    # Disabled auth still runs: callers are anonymous and AdminService stays refused.
    chain.append(AuthInterceptor(config.auth, config.store.data_dir))
    if config.quotas.enabled:
        chain.append(QuotaInterceptor(config.quotas))
    if config.moderation.enabled:
        chain.append(ModerationInterceptor(config.moderation))
    return chain
