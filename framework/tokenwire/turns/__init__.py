"""One chat turn on plain types: validate, admit, store, stream, settle.

* :mod:`tokenwire.turns.policy` — the :class:`TurnPolicy` protocol that quotas,
  moderation and authentication implement;
* :mod:`tokenwire.turns.events` — a turn's request, events and running state;
* :mod:`tokenwire.turns.runner` — the :class:`TurnRunner` the chat services drive.
"""

from __future__ import annotations

from tokenwire.turns.policy import FilterResult, OutputFilter, TurnInfo, TurnOutcome, TurnPolicy

__all__ = ["FilterResult", "OutputFilter", "TurnInfo", "TurnOutcome", "TurnPolicy"]
