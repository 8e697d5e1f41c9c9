"""History that fits: a conversation's messages cut oldest-first to the model's context.

The prompt of a turn is the system prompt (always kept), as much of the
conversation's history as fits, and the new user message. What must fit is the
prompt plus the answer's room (the turn's ``max_tokens``, or the server's
default); whole exchanges go first, oldest first, so the kept history always
starts with a user message, as chat templates expect::

    messages = fit_history(model, system, history, user, reserve=256)
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenwire.backend import ChatMessage
from tokenwire.model.frontend import ChatModel

__all__ = ["fit_history"]


def fit_history(
    model: ChatModel,
    system: Sequence[ChatMessage],
    history: Sequence[ChatMessage],
    user: ChatMessage,
    reserve: int,
) -> list[ChatMessage]:
    """``system + kept history + [user]``: the longest suffix of ``history`` that starts
    with a user message and leaves ``reserve`` tokens of the model's context free.

    A model that cannot count prompt tokens (a text backend) keeps all of it.
    The fewest templatings that decide it: one when everything fits, else a
    binary search over the cut points.
    """
    # Cut points: the history may start at any user message (or be empty).
    starts = [i for i, m in enumerate(history) if m.role == "user"] + [len(history)]

    def build(start: int) -> list[ChatMessage]:
        return [*system, *history[start:], user]

    budget = model.context_length - reserve

    def fits(start: int) -> bool:
        tokens = model.prompt_tokens(build(start))
        return tokens == 0 or tokens <= budget

    if len(starts) == 1 or fits(starts[0]):
        return build(starts[0])
    # fits() is monotone in the cut point: find the earliest start that fits.
    low, high = 1, len(starts) - 1  # starts[0] does not fit; the last (no history) may not either
    while low < high:
        middle = (low + high) // 2
        if fits(starts[middle]):
            high = middle
        else:
            low = middle + 1
    # The last cut keeps no history at all: if even that is too long, prepare() says why.
    return build(starts[low])
