"""Moderation on every chat turn: the user's message first, then the answer as it streams.

Moderation is a turn policy only (it has no call-level half). ``before_turn``
checks the user's message with each moderator in order (rules first: they cost
microseconds) and refuses a flagged one with :class:`ContentFilteredError`
(INVALID_ARGUMENT, ``error_type`` "content_filter"; a ``TurnError`` with
``filter_category`` on Converse) before anything is stored or generated. The
answer goes through a fresh :func:`~tokenwire.moderation.stream.output_filter`
per turn, so flagged text is never sent and the stored answer is exactly what
the client saw. Flagged decisions go to the audit log (every check with
``moderation.audit_all_checks``).

    ModerationPolicy(ModerationConfig(moderator="both"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenwire.errors import ConfigError, ContentFilteredError, UnavailableError
from tokenwire.moderation import (
    EmbeddingModerator,
    ModerationAudit,
    ModerationConfig,
    Moderator,
    RuleModerator,
    Verdict,
    moderator_name,
    output_filter,
)
from tokenwire.moderation.actions import (
    BLOCK,
    CategoryActions,
    FlagEvent,
    FlagSink,
    TenantOverrides,
)
from tokenwire.moderation.audit import audit_key_path
from tokenwire.moderation.classifier import ClassifierModerator
from tokenwire.moderation.combine import AllModerator, EscalatingModerator
from tokenwire.turns.policy import OutputFilter, TurnInfo, TurnOutcome

if TYPE_CHECKING:
    from tokenwire.model.frontend import ChatModel
    from tokenwire.router.config import RouterConfig

__all__ = ["ModerationPolicy", "build_moderators"]


def build_moderators(
    config: ModerationConfig, *, guard: Moderator | None = None
) -> list[Moderator]:
    """The moderators ``config`` asks for, combined as it says; not yet started.

    ``guard`` is the guard-model moderator, built where the model it asks lives.
    """
    config.validate()
    built: list[Moderator] = []
    for name in config.moderator_names:
        if name == "rules":
            window = config.output_window_chars
            built.append(
                RuleModerator.from_file(config.rules_file, pattern_window=window)
                if config.rules_file
                else RuleModerator(pattern_window=window)
            )
        elif name == "classifier":
            built.append(
                ClassifierModerator(
                    config.classifier_file or None,
                    threshold=config.classifier_threshold or None,
                )
            )
        elif name == "embedding":
            threshold = config.embedding_threshold
            built.append(
                EmbeddingModerator.from_file(config.embedding_exemplars_file, threshold=threshold)
                if config.embedding_exemplars_file
                else EmbeddingModerator(threshold=threshold)
            )
        elif name == "guard":
            if guard is None:
                raise ConfigError(
                    "moderation.moderator names 'guard', but no guard model was given "
                    "(see moderation.guard_* settings)"
                )
            built.append(guard)
    if config.combine == "all" and len(built) > 1:
        return [AllModerator(built)]
    if config.combine == "escalate":
        # Rules are sure when they flag and say nothing when they do not: they stay a
        # screen of their own; the model-based ones escalate, cheapest first.
        rules = [m for m in built if isinstance(m, RuleModerator)]
        models = [m for m in built if not isinstance(m, RuleModerator)]
        if len(models) > 1:
            return [*rules, EscalatingModerator(models, unsure_from=config.escalate_unsure_from)]
    return built


class ModerationPolicy:
    """Checks chat input and output with the configured moderators (or ``moderator``)."""

    def __init__(
        self,
        config: ModerationConfig,
        *,
        moderator: Moderator | None = None,
        data_dir: str | None = None,
        flags: FlagSink | None = None,
        overrides: TenantOverrides | None = None,
        router: RouterConfig | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self._given = moderator
        self._flags = flags  # hears every flag: the abuse monitor counts them
        self._router = router  # for a guard model on workers of its own
        self._served: ChatModel | None = None  # the gateway's model, for guard_target 'serving'

        self.actions = CategoryActions(
            config.categories, config.tenant_categories, config.keep_text_for, overrides
        )
        self._data_dir = data_dir  # where the audit log's key lives; None: a key per process
        self._moderators: tuple[Moderator, ...] = ()
        self._ready = False
        self._audit = ModerationAudit(enabled=False)

    def bind_model(self, model: ChatModel) -> None:
        """The server hands over its served model (the guard may ask it) before start()."""
        self._served = model

    @property
    def moderators(self) -> tuple[Moderator, ...]:
        """The started moderators, in the order they check."""
        return self._moderators

    async def start(self) -> None:
        """Build and start the moderators (loads the embedding model, if configured)."""
        if not self.config.enabled or self._ready:
            return
        key_file = audit_key_path(self._data_dir) if self._data_dir is not None else None
        self._audit = ModerationAudit(
            enabled=self.config.audit, all_checks=self.config.audit_all_checks, key_file=key_file
        )
        moderators = (
            [self._given]
            if self._given is not None
            else build_moderators(self.config, guard=self._guard())
        )
        started: list[Moderator] = []
        try:
            for moderator in moderators:
                start = getattr(moderator, "start", None)
                if start is not None:
                    await start()
                started.append(moderator)
        except BaseException:
            await _close(started)
            raise
        self._moderators = tuple(moderators)
        self._ready = True

    def _guard(self) -> Moderator | None:
        if "guard" not in self.config.moderator_names:
            return None
        from tokenwire.moderation.guard import build_guard  # the frontend, the router

        return build_guard(
            self.config.guard_target,
            serving=self._served,
            router=self._router,
            tokenizer=self.config.guard_tokenizer,
            prompt=self.config.guard_prompt_text,
            max_tokens=self.config.guard_max_tokens,
            timeout_s=self.config.guard_timeout_s,
            fail_closed=self.config.guard_fail_closed,
        )

    async def close(self) -> None:
        """Release the moderators."""
        moderators, self._moderators, self._ready = self._moderators, (), False
        await _close(list(moderators))

    async def before_turn(self, turn: TurnInfo) -> None:
        """Refuse a flagged message before anything is stored or generated."""
        if not self.config.enabled:
            return
        if not self._ready:  # fail closed: never serve chat unmoderated
            raise UnavailableError("moderation is not ready; retry shortly")
        if not self.config.input:
            return
        for moderator in self._moderators:
            verdict = await moderator.check(turn.message)
            action = ""
            if verdict.flagged:
                action = self.actions.action(turn.principal, verdict.category)
            self._record(turn, "input", moderator_name(moderator), verdict, turn.message, action)
            if action == BLOCK:
                raise ContentFilteredError(verdict.category)

    def output_filter(self, turn: TurnInfo) -> OutputFilter | None:
        """A fresh filter for this turn's answer, or None when output is not checked."""
        if not self.config.enabled or not self.config.output or not self._moderators:
            return None

        def report(name: str, verdict: Verdict, text: str, action: str) -> None:
            self._record(turn, "output", name, verdict, text, action)

        def decide(verdict: Verdict) -> str:
            return self.actions.action(turn.principal, verdict.category)

        # Passed checks are recorded only when the audit wants them: a check per token.
        return output_filter(
            self._moderators,
            check_chars=self.config.embedding_check_chars,
            report=report,
            report_passed=self._audit.all_checks,
            decide=decide,
        )

    async def after_turn(self, turn: TurnInfo, outcome: TurnOutcome) -> None:
        """Nothing to settle."""
        return None

    def _record(
        self, turn: TurnInfo, direction: str, name: str, verdict: Verdict, text: str, action: str
    ) -> None:
        self._audit.record(
            direction=direction,
            verdict=verdict,
            moderator=name,
            text=text,
            principal=turn.principal,
            turn_id=turn.turn_id,
            action=action,
        )
        if verdict.flagged and self._flags is not None:
            keep = self.actions.keeps_text(turn.principal)
            event = FlagEvent(
                turn.principal, turn.turn_id, direction, verdict.category, name,
                verdict.score, action or BLOCK, text if keep else "", keep,
            )  # fmt: skip
            self._flags.flagged(event)


async def _close(moderators: list[Moderator]) -> None:
    for moderator in reversed(moderators):
        close = getattr(moderator, "close", None)
        if close is not None:
            await close()
