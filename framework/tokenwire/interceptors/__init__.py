"""Call-level interceptors: the framework (one ``intercept`` for all four RPC shapes) and
errors + logging. Authentication and quotas keep their interceptors in their own
packages (:mod:`tokenwire.auth.interceptor`, :mod:`tokenwire.quotas.interceptor`);
:mod:`tokenwire.pipeline` declares the chain's order.
"""

from __future__ import annotations

from tokenwire.interceptors.base import (
    CallInfo,
    Interceptor,
    InterceptorChain,
    Proceed,
    UndecodableRequest,
)
from tokenwire.interceptors.errors import REQUEST_ID_HEADER, ErrorsInterceptor

__all__ = [
    "REQUEST_ID_HEADER",
    "CallInfo",
    "ErrorsInterceptor",
    "Interceptor",
    "InterceptorChain",
    "Proceed",
    "UndecodableRequest",
]
