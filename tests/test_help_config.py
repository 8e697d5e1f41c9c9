"""`tokenwire serve --help-config`: every setting with its default, variable and help text."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tokenwire.cli import main
from tokenwire.config import Config

TOKENWIRE = Path(sys.executable).with_name("tokenwire")  # the console script beside python


def help_config(capsys: pytest.CaptureFixture[str]) -> str:
    """What `tokenwire serve --help-config` prints; it must exit 0 and print nothing to stderr."""
    assert 0 == main(["serve", "--help-config"])
    out, err = capsys.readouterr()
    assert "" == err
    return out


def sections(text: str) -> dict[str, str]:
    """The printed text split by its ``[section]`` headers."""
    parts = re.split(r"^\[(\w+)\]", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_known_settings_are_printed_with_default_variable_and_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A few settings, spelled out: name = default, then the variable and the description."""
    text = help_config(capsys)
    assert (
        "[server]  The gRPC listener and its lifecycle.\n"
        "  listen = '127.0.0.1:50051'\n"
        "      TOKENWIRE_SERVER_LISTEN: HOST:PORT to listen on; port 0 picks a free port\n"
    ) in text
    assert (
        "  max_history_messages = 64\n"
        "      TOKENWIRE_LIMITS_MAX_HISTORY_MESSAGES: "
        "most stored messages of a conversation sent to the model as history\n"
    ) in text
    assert (
        "  system_prompt = ''\n"
        "      TOKENWIRE_LIMITS_SYSTEM_PROMPT: "
        "system message prepended to every conversation; empty: none\n"
    ) in text


def test_every_field_of_every_section_is_printed_with_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each section of Config is listed in order, each of its fields with a non-empty help text."""
    printed = sections(help_config(capsys))
    hints = typing.get_type_hints(Config)
    assert [f.name for f in dataclasses.fields(Config)] == list(printed)
    for section in dataclasses.fields(Config):
        block = printed[section.name]
        fields = dataclasses.fields(hints[section.name])
        names = re.findall(r"^  (\w+) = ", block, flags=re.MULTILINE)
        assert [f.name for f in fields] == names, section.name
        for f in fields:
            help_text = f.metadata.get("help", "")
            assert help_text.strip(), f"{section.name}.{f.name} has no help text"
            assert "\n" not in help_text, f"{section.name}.{f.name}: help is not one line"
            variable = f"TOKENWIRE_{section.name.upper()}_{f.name.upper()}"
            assert f"      {variable}: {help_text}\n" in block


def test_the_console_script_prints_the_same_and_serves_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The installed `tokenwire` command prints the same text and exits 0 without serving."""
    expected = help_config(capsys)
    run = subprocess.run(
        [str(TOKENWIRE), "serve", "--help-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (0, "", expected) == (run.returncode, run.stderr, run.stdout)
