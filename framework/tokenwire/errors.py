"""Errors that carry their gRPC status code, and the one place that maps them.

Raise a :class:`TokenwireError` subclass anywhere. Backends included: this module
imports no grpc (codes are :class:`Code`, google.rpc's numbers, which equal gRPC's
status codes); the errors interceptor turns an error into a status with
:func:`status_of`. Anything else becomes INTERNAL with a generic message, so
clients never see a stack trace.

    raise InvalidArgumentError("max_tokens must be >= 0, got -3")
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from google.protobuf.message import Message

__all__ = [
    "AbortedError",
    "CancelledError",
    "Code",
    "ConfigError",
    "ContentFilteredError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TokenwireError",
    "UnauthenticatedError",
    "UnavailableError",
    "status_of",
]


class Code(enum.IntEnum):
    """Status codes, numbered as google.rpc.Code (and gRPC) number them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TokenwireError(Exception):
    """Base of every error the framework reports to clients.

    ``code`` is the gRPC status; ``error_type`` a stable string clients may
    switch on; ``message`` is safe to show to the caller.
    """

    code: ClassVar[Code] = Code.INTERNAL
    error_type: ClassVar[str] = "internal"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s  # sent as google.rpc.RetryInfo
        self.details = tuple(details)  # more google.rpc details (QuotaFailure, BadRequest...)


class InvalidArgumentError(TokenwireError):
    """The request is malformed or out of bounds."""

    code = Code.INVALID_ARGUMENT
    error_type = "invalid_argument"


class ContentFilteredError(InvalidArgumentError):
    """Moderation refused the user's input; ``category`` names why."""

    error_type = "content_filter"

    def __init__(self, category: str, message: str | None = None) -> None:
        super().__init__(message or f"the message was refused by moderation ({category})")
        self.category = category


class NotFoundError(TokenwireError):
    """The named model, conversation or key does not exist (for this caller)."""

    code = Code.NOT_FOUND
    error_type = "not_found"


class FailedPreconditionError(TokenwireError):
    """The request is valid but the system is not in a state to run it."""

    code = Code.FAILED_PRECONDITION
    error_type = "failed_precondition"


class AbortedError(TokenwireError):
    """A concurrent request conflicted with this one; retry."""

    code = Code.ABORTED
    error_type = "aborted"


class ResourceExhaustedError(TokenwireError):
    """Over capacity or quota; ``retry_after_s`` says when to retry."""

    code = Code.RESOURCE_EXHAUSTED
    error_type = "resource_exhausted"


class UnauthenticatedError(TokenwireError):
    """Missing or invalid credentials."""

    code = Code.UNAUTHENTICATED
    error_type = "unauthenticated"


class PermissionDeniedError(TokenwireError):
    """A known caller without the required role."""

    code = Code.PERMISSION_DENIED
    error_type = "permission_denied"


class UnavailableError(TokenwireError):
    """The server is shutting down or a backend is unreachable; retry elsewhere."""

    code = Code.UNAVAILABLE
    error_type = "unavailable"


class DeadlineExceededError(TokenwireError):
    """The call's deadline passed."""

    code = Code.DEADLINE_EXCEEDED
    error_type = "deadline_exceeded"


class CancelledError(TokenwireError):
    """The caller cancelled."""

    code = Code.CANCELLED
    error_type = "cancelled"


class InternalError(TokenwireError):
    """A bug or backend failure; details go to the log, not the client."""


class ConfigError(TokenwireError):
    """Configuration is invalid; raised at start-up, never to a client."""

    code = Code.FAILED_PRECONDITION
    error_type = "config"


_INTERNAL_MESSAGE = "internal error; the server log has details under this call's request id"


def status_of(exc: BaseException) -> tuple[Code, str, str]:
    """Map any exception to ``(code, client-safe message, error_type)``.

    The only mapping from exceptions to status codes in the framework.
    """
    if isinstance(exc, TokenwireError) and not isinstance(exc, InternalError):
        return exc.code, exc.message, exc.error_type
    if isinstance(exc, NotImplementedError):  # a generated servicer's method left out
        return Code.UNIMPLEMENTED, "this method is not implemented by this server", "unimplemented"
    return Code.INTERNAL, _INTERNAL_MESSAGE, "internal"
