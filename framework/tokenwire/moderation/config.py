"""Moderation settings: which moderators run, on which direction, and how they are tuned.

[moderation]
moderator = "both"            # rules, embedding or both
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

MODERATORS = ("rules", "embedding", "both")


@dataclass(frozen=True, slots=True)
class ModerationConfig:
    """Input and output moderation, with an audit log of its decisions."""

    enabled: bool = setting(True, "moderate chat turns at all")
    moderator: str = setting(
        "rules", "'rules' (terms and patterns), 'embedding' (a sentence-embedding model) or 'both'"
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
    def keep_text_for(self) -> frozenset[str]:
        """The tenants of ``keep_text_tenants``."""
        return frozenset(t.strip() for t in self.keep_text_tenants.split(",") if t.strip())

    def validate(self) -> None:
        """Raise ConfigError naming the first bad setting."""
        if self.moderator not in MODERATORS:
            raise ConfigError(
                f"moderation.moderator must be one of {', '.join(MODERATORS)}, "
                f"got {self.moderator!r}"
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
