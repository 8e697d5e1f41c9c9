"""Import hygiene: the backend contract needs no grpc, and no module depends on import order."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_backends_import_the_contract_and_errors_without_grpc() -> None:
    """tokenwire.backend and tokenwire.errors load without grpc or protobuf in sys.modules."""
    result = _run(
        """
        import sys
        import tokenwire.backend, tokenwire.errors
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "google"))
        print(loaded)
        """
    )
    assert 0 == result.returncode, result.stderr
    assert "[]" == result.stdout.strip()


@pytest.mark.parametrize(
    "module",
    [
        "tokenwire.context",
        "tokenwire.auth.principal",
        "tokenwire.turns.policy",
        "tokenwire.turns.runner",
        "tokenwire.turns.admission",
        "tokenwire.pipeline",
        "tokenwire.services.chat",
        "tokenwire.moderation.policy",
        "tokenwire.quotas.policy",
        "tokenwire.auth.policy",
        "tokenwire.model.frontend",
        "tokenwire.client",
    ],
)
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """Imported first, before anything else of tokenwire, the module loads: no import cycle."""
    result = _run(f"import {module}")
    assert 0 == result.returncode, result.stderr
