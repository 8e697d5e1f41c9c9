"""Configuration: defaults < file < environment < overrides, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire.backend import BackendConfig, available_backends, create_backend
from tokenwire.cli import main
from tokenwire.config import Config, describe, load_config
from tokenwire.errors import ConfigError
from tokenwire.testing import FakeBackend


def test_defaults_are_the_embedded_single_process_setup() -> None:
    """With nothing set: torch on auto device, 127.0.0.1:50051, SQLite under .tokenwire."""
    config = load_config(env={})
    assert "127.0.0.1:50051" == config.server.listen
    assert "torch" == config.backend.name
    assert ".tokenwire/conversations.db" == config.store.resolved_sqlite_path()


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    """Each layer overrides the one before it, field by field."""
    path = tmp_path / "tokenwire.toml"
    path.write_text(
        '[server]\nlisten = "0.0.0.0:1"\ngrace_period_s = 3\n[backend]\ndevice = "cpu"\n'
    )
    env = {"TOKENWIRE_SERVER_LISTEN": "0.0.0.0:2", "TOKENWIRE_LIMITS_MAX_STOP_STRINGS": "3"}
    config = load_config(path, env=env, overrides={"backend.device": "cuda"})
    assert "0.0.0.0:2" == config.server.listen
    assert 3.0 == config.server.grace_period_s
    assert 3 == config.limits.max_stop_strings
    assert "cuda" == config.backend.device


def test_backend_options_parse_from_a_string() -> None:
    """Backend options given as key=value pairs become a mapping."""
    config = load_config(env={"TOKENWIRE_BACKEND_OPTIONS": "reply=hi, endless=true"})
    assert {"reply": "hi", "endless": "true"} == dict(config.backend.options)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOKENWIRE_SERVER_GRACE_PERIOD_S": "soon"}, "grace_period_s"),
        ({"TOKENWIRE_SERVER_REUSE_PORT": "maybe"}, "not a boolean"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    """A value of the wrong type is a ConfigError naming where it came from."""
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    """Typos in a config file fail loudly instead of being ignored."""
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nlisten_on = 'x'\n")
    with pytest.raises(ConfigError, match="unknown setting 'listen_on'"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(env={}, overrides={"nope.x": "1"})


def test_config_is_frozen() -> None:
    """Configuration cannot change after it is read."""
    config = Config()
    with pytest.raises(AttributeError):
        config.server.listen = "elsewhere"  # type: ignore[misc]


def test_every_setting_is_described() -> None:
    """describe() lists each field with its environment variable and a description."""
    text = describe()
    assert "TOKENWIRE_SERVER_LISTEN" in text
    assert "TOKENWIRE_BACKEND_DEVICE" in text
    assert "TOKENWIRE_LIMITS_MAX_MESSAGE_CHARS" in text
    assert ": \n" not in text  # no setting without a description


def test_backends_are_found_through_entry_points() -> None:
    """The fake and torch backends are registered under tokenwire.backends."""
    assert {"fake", "torch"} <= set(available_backends())
    assert isinstance(create_backend(BackendConfig(name="fake")), FakeBackend)


def test_unknown_backend_names_the_known_ones() -> None:
    """Asking for a backend nobody registered lists the ones that exist."""
    with pytest.raises(ConfigError, match=r"registered backends: .*fake"):
        create_backend(BackendConfig(name="nonexistent"))


def test_cli_reports_config_errors_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """`tokenwire serve` with a bad setting exits 2 with a one-line message."""
    assert 2 == main(["serve", "--set", "server.grace_period_s=soon"])
    err = capsys.readouterr().err
    assert "grace_period_s" in err
    assert "Traceback" not in err
