"""What a suspended or throttled principal is told: the status, the reason, when to retry.

Both errors keep the status of their base class in :mod:`tokenwire.errors`
(PERMISSION_DENIED, RESOURCE_EXHAUSTED) and name themselves with an
``error_type`` of their own, so a client can tell a suspension from a missing role
and a throttle from a quota.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from google.rpc import error_details_pb2

from tokenwire.abuse.store import Account, Standing
from tokenwire.errors import PermissionDeniedError, ResourceExhaustedError

__all__ = ["THROTTLE_QUOTA", "AccountSuspendedError", "AccountThrottledError"]

THROTTLE_QUOTA: Final = "abuse_throttle_turns_per_minute"
"""The QuotaFailure description and quota id of a throttle refusal."""


def _when(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class AccountSuspendedError(PermissionDeniedError):
    """The principal is suspended for repeated policy violations; every call is refused."""

    error_type = "account_suspended"

    def __init__(self, standing: Standing) -> None:
        ends = f"until {_when(standing.until)}" if standing.until else "until it is lifted"
        super().__init__(
            f"suspended for repeated policy violations: {standing.reason or 'flagged messages'};"
            f" {ends}; contact your administrator"
        )
        self.standing = standing


class AccountThrottledError(ResourceExhaustedError):
    """The principal is throttled for repeated policy violations and started its turns
    too fast; ``retry_after_s`` says when the next one fits."""

    error_type = "account_throttled"

    def __init__(
        self, account: Account, standing: Standing, turns: int, window_s: float, retry_s: float
    ) -> None:
        failure = error_details_pb2.QuotaFailure()
        failure.violations.add(
            subject=f"principal:{account.name}",
            description=THROTTLE_QUOTA,
            quota_id=THROTTLE_QUOTA,
            quota_value=turns,
        )
        super().__init__(
            f"throttled for repeated policy violations ({standing.flags} flagged messages "
            f"recently): at most {turns} turns per {window_s:g}s; retry in {retry_s:g}s",
            retry_after_s=retry_s,
            details=[failure],
        )
