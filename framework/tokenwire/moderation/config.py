"""Moderation settings: which moderators run, on which direction, and how they are tuned.

[moderation]
moderator = "rules,classifier"   # any of rules, classifier, embedding, guard
combine = "any"                  # any, all or escalate
rules_file = "rules.toml"     # [categories.<name>] terms = [...], patterns = [...]
embedding_threshold = 0.5
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from tokenwire.config_fields import setting
from tokenwire.errors import ConfigError
from tokenwire.moderation.actions import parse_actions, parse_tenant_actions

__all__ = ["MODERATORS", "ModerationConfig"]

MODERATORS = ("rules", "classifier", "embedding", "guard")
_ALIASES = {"both": "rules,embedding"}  # the older name of a pair
COMBINE = ("any", "all", "escalate")


@dataclass(frozen=True, slots=True)
class ModerationConfig:
    """Input and output moderation, with an audit log of its decisions."""

    enabled: bool = setting(True, "moderate chat turns at all")
    moderator: str = setting(
        "rules,classifier",
        "comma-separated moderators, cheapest first: rules (terms and patterns), classifier "
        "(trained on sentence embeddings), embedding (nearest exemplars), guard (a chat "
        "model asked to classify)",
    )
    combine: str = setting(
        "any",
        "how moderators decide together: any (the first flag wins), all (flag only what "
        "every one flags), escalate (rules apart; each model-based one passes text it is "
        "unsure of to the next, e.g. classifier then guard)",
    )
    classifier_file: str = setting(
        "", "classifier weights (scripts/train_moderation_classifier.py); empty: the shipped file"
    )
    classifier_threshold: float = setting(
        0.0, "probability of not-safe at which the classifier flags; 0: the file's own"
    )
    escalate_unsure_from: float = setting(
        0.15,
        "escalate: a clean verdict scoring at least this (and below the flag threshold) "
        "is unsure and goes on to the next moderator",
    )
    input: bool = setting(True, "check the user's message before the model runs")
    output: bool = setting(
        True, "check the answer as it streams, holding text back until it is checked"
    )
    output_window_chars: int = setting(
        64,
        "normalized characters of the answer held back for the rules' regex patterns "
        "(a pattern must match within this many); plain terms need no fixed window",
    )
    rules_file: str = setting(
        "", "TOML file with [categories.NAME] terms and patterns; empty: the built-in rules"
    )
    embedding_threshold: float = setting(
        0.5,
        "cosine similarity to a category's exemplars at which the embedding moderator "
        "flags (it must also beat the safe exemplars)",
    )
    embedding_exemplars_file: str = setting(
        "", "TOML file with [categories.NAME] and [safe] examples; empty: the built-in set"
    )
    embedding_check_chars: int = setting(
        400,
        "the embedding moderator checks held-back output at each sentence end "
        "or after this many characters",
    )
    categories: Mapping[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "category -> block | log | allow for every tenant, as a "
            "[moderation.categories] table or 'hate=log,violence=allow'; absent: block"
        },
    )
    tenant_categories: Mapping[str, Mapping[str, str]] = field(
        default_factory=dict,
        metadata={
            "help": "tenant (or 'plan:NAME') -> its category actions, e.g. "
            "acme = 'violence:allow drugs:log'; env 'acme=violence:allow,plan:pro=hate:log'"
        },
    )
    keep_text_tenants: str = setting(
        "",
        "comma-separated tenants whose flagged events keep the flagged text "
        "(others: category, score and an HMAC only)",
    )
    guard_target: str = setting(
        "serving",
        "the guard moderator's model: 'serving' (the gateway's own served model) or a "
        "router.workers entry for guard workers (vllm://host:port, dns:///guard:50061)",
    )
    guard_tokenizer: str = setting(
        "",
        "guard workers only: a directory with the guard model's tokenizer files, for "
        "servers that do not send theirs (trtllm-serve); empty: asked of the workers",
    )
    guard_timeout_s: float = setting(
        10.0, "longest a guard check may take; past it the turn fails UNAVAILABLE"
    )
    guard_max_tokens: int = setting(24, "longest guard answer read (the topic and a verdict)")
    guard_prompt: str = setting(
        "builtin",
        "what the guard model is asked: 'builtin' (a safety system prompt and example turns, "
        "for chat models that are not guard models), 'none' (the text alone: guard models "
        "whose chat template holds the policy, e.g. Llama Guard 3), a template holding "
        "{message} (the whole user turn, e.g. ShieldGemma's), or any other text as the "
        "system prompt",
    )
    guard_fail_closed: bool = setting(
        True,
        "a guard check that fails or times out ends the turn UNAVAILABLE; false: it passes "
        "(audited as guard_unavailable)",
    )
    audit: bool = setting(
        True, "log flagged decisions to the 'tokenwire.audit' logger (a hash, never the text)"
    )
    audit_all_checks: bool = setting(
        False, "also log every check that passed (verbose: one line per checked output window)"
    )

    def __post_init__(self) -> None:
        categories = parse_actions(self.categories, "moderation.categories")
        object.__setattr__(self, "categories", types.MappingProxyType(categories))
        tenants = parse_tenant_actions(self.tenant_categories, "moderation.tenant_categories")
        object.__setattr__(self, "tenant_categories", types.MappingProxyType(tenants))

    @property
    def guard_prompt_text(self) -> str | None:
        """``guard_prompt`` as the guard takes it: None for the built-in prompt, "" for none."""
        value = self.guard_prompt.strip()
        return {"builtin": None, "none": ""}.get(value, self.guard_prompt)

    @property
    def keep_text_for(self) -> frozenset[str]:
        """The tenants of ``keep_text_tenants``."""
        return frozenset(t.strip() for t in self.keep_text_tenants.split(",") if t.strip())

    @property
    def moderator_names(self) -> tuple[str, ...]:
        """The moderators of ``moderator``, in order."""
        names = _ALIASES.get(self.moderator.strip(), self.moderator)
        return tuple(name.strip() for name in names.split(",") if name.strip())

    def validate(self) -> None:
        """Raise ConfigError naming the first bad setting."""
        names = self.moderator_names
        unknown = [name for name in names if name not in MODERATORS]
        if not names or unknown or len(set(names)) != len(names):
            raise ConfigError(
                "moderation.moderator is a comma-separated list of distinct moderators from "
                f"{', '.join(MODERATORS)}, got {self.moderator!r}"
            )
        if self.combine not in COMBINE:
            raise ConfigError(
                f"moderation.combine must be one of {', '.join(COMBINE)}, got {self.combine!r}"
            )
        if not 0.0 <= self.classifier_threshold < 1.0:
            raise ConfigError(
                "moderation.classifier_threshold is a probability in [0, 1), "
                f"got {self.classifier_threshold}"
            )
        if not 0.0 <= self.escalate_unsure_from <= 1.0:
            raise ConfigError(
                "moderation.escalate_unsure_from must be in [0, 1], "
                f"got {self.escalate_unsure_from}"
            )
        if self.guard_timeout_s <= 0 or self.guard_max_tokens < 1:
            raise ConfigError(
                "moderation.guard_timeout_s must be > 0 and guard_max_tokens >= 1, got "
                f"{self.guard_timeout_s} and {self.guard_max_tokens}"
            )
        if self.output_window_chars < 1:
            raise ConfigError(
                f"moderation.output_window_chars must be >= 1, got {self.output_window_chars}"
            )
        if not -1.0 <= self.embedding_threshold <= 1.0:
            raise ConfigError(
                "moderation.embedding_threshold is a cosine similarity in [-1, 1], "
                f"got {self.embedding_threshold}"
            )
        if self.embedding_check_chars < 1:
            raise ConfigError(
                f"moderation.embedding_check_chars must be >= 1, got {self.embedding_check_chars}"
            )
