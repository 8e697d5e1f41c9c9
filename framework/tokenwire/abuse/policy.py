"""The turn-level half of abuse signals: throttled principals' turns, counted and refused.

:class:`AbusePolicy` runs before quotas (a refused turn counts against no quota
or budget) and after the credential check. For each turn it asks the monitor:
a suspended principal's turn is refused with PERMISSION_DENIED (a Converse
stream opened before the suspension ends here), a throttled principal's turn
takes one of ``abuse.throttle_turns_per_minute`` and beyond it is refused with
RESOURCE_EXHAUSTED and the delay (google.rpc RetryInfo), before TurnStarted and
before anything is stored. A principal in good standing costs a cache lookup;
only a throttled one costs a store round trip per turn.

The flags themselves come from moderation, which runs after this policy and
reports every flag to the monitor (its ``FlagSink``).
"""

from __future__ import annotations

from tokenwire.abuse.monitor import AbuseMonitor
from tokenwire.turns.policy import OutputFilter, TurnInfo, TurnOutcome

__all__ = ["AbusePolicy"]


class AbusePolicy:
    """Per-turn suspension and throttle checks over ``monitor``."""

    __slots__ = ("monitor",)

    def __init__(self, monitor: AbuseMonitor) -> None:
        self.monitor = monitor

    async def start(self) -> None:
        """Start the monitor (a no-op when the suspension interceptor started it)."""
        await self.monitor.start()

    async def close(self) -> None:
        """Close the monitor: pending flags are recorded, pending events written."""
        await self.monitor.close()

    async def before_turn(self, turn: TurnInfo) -> None:
        """Refuse a suspended principal's turn, or a throttled one's beyond its rate."""
        await self.monitor.admit_turn(turn.principal)

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        """Abuse signals do not look at the answer (moderation reports its flags)."""
        return None

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        """Nothing to settle: a throttled turn is counted when it starts."""
        return None
