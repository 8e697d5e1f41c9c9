"""The deployment manifests name only settings that exist, with values the config accepts."""

from __future__ import annotations

import re
from pathlib import Path

from tokenwire.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
_LITERAL = re.compile(r"\{name: (TOKENWIRE_[A-Z0-9_]+), value: \"?([^\"}]*)\"?\}")
_NAME = re.compile(r"\b(TOKENWIRE_[A-Z0-9_]+)\b")


def test_every_setting_in_the_manifests_exists_and_parses() -> None:
    """Each TOKENWIRE_* variable of a manifest is a real setting; literal values load."""
    manifests = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    assert len(manifests) >= 5
    for manifest in manifests:
        text = manifest.read_text()
        literal = dict(_LITERAL.findall(text))
        named = set(_NAME.findall(text))
        # Secret-backed ones get a placeholder of the right kind.
        env = {name: literal.get(name, "secret") for name in named}
        config = load_config(env=env)  # a bad value raises ConfigError
        for name in named:
            section, _, field = name.removeprefix("TOKENWIRE_").lower().partition("_")
            assert hasattr(getattr(config, section, None), field), f"{manifest.name}: {name}"
        for name, value in literal.items():
            section, _, field = name.removeprefix("TOKENWIRE_").lower().partition("_")
            assert str(getattr(getattr(config, section), field)).lower() == value.lower() or (
                value.replace(".", "", 1).isdigit()
            ), name
