"""The example backend package installs with pip, registers through its entry point, and serves.

``examples/backend_package`` is built and installed (``pip install --no-deps
--no-build-isolation --no-index --target``) into a temporary folder, which then
goes on ``sys.path`` as a site directory would: nothing beyond what is installed
here is needed, and nothing is written into the source tree.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tokenwire.backend import BackendConfig, Engine, available_backends, create_backend
from tokenwire.proto.v1 import chat_pb2
from tokenwire.testing import running_server

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "examples" / "backend_package"
NAME = "counter"  # the package's entry point in the group tokenwire.backends
MODULE = "tokenwire_counter"


def _load_package_tests() -> ModuleType:
    """The package's own test module, whose conformance class runs below as well."""
    path = PACKAGE / "tests" / "test_counter.py"
    spec = importlib.util.spec_from_file_location("backend_package_tests", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_package_tests = _load_package_tests()
counter = _package_tests.counter  # its fixture: the engine built through the entry point


@pytest.fixture(scope="module", autouse=True)
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example package installed into a temporary folder that is on sys.path."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the example offline needs setuptools in this environment")
    source = tmp_path_factory.mktemp("source") / "backend_package"
    shutil.copytree(
        PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target),
               str(source)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert 0 == done.returncode, done.stdout + done.stderr
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        sys.modules.pop(MODULE, None)
        importlib.invalidate_caches()


def test_the_entry_point_is_found(installed: Path) -> None:
    """create_backend finds the installed package by its entry point name and builds an Engine."""
    assert f"{MODULE}:create_engine" == available_backends()[NAME]
    engine = create_backend(BackendConfig(name=NAME, options={"step_ms": "5"}))
    assert isinstance(engine, Engine)
    assert (NAME, 0.005) == (engine.capabilities.model, getattr(engine, "step_s", None))
    assert installed in Path(sys.modules[MODULE].__file__ or "").parents


class TestExamplePackageConformance(_package_tests.TestCountingEngine):  # type: ignore[misc]
    """The package's own conformance test: the engine conformance suite over its engine."""


async def test_a_server_serves_a_chat_turn_with_it() -> None:
    """A real server around the installed engine streams its answer, bounded by max_tokens."""
    engine = create_backend(BackendConfig(name=NAME))
    async with running_server(engine) as running:
        request = chat_pb2.CompleteRequest(
            message="Count, please.", params=chat_pb2.SamplingParams(max_tokens=8)
        )
        events = [event async for event in running.chat.Complete(request)]
    assert NAME == events[0].started.model
    assert "1 2 3 4 " == "".join(e.delta.text for e in events if e.HasField("delta"))
    finished = events[-1].finished
    assert (chat_pb2.FINISH_REASON_LENGTH, 8) == (
        finished.finish_reason,
        finished.usage.completion_tokens,
    )


async def test_a_stop_string_ends_the_served_answer() -> None:
    """The framework's stop strings work over the engine: the answer ends before "4"."""
    engine = create_backend(BackendConfig(name=NAME))
    async with running_server(engine) as running:
        request = chat_pb2.CompleteRequest(
            message="Count, please.", params=chat_pb2.SamplingParams(max_tokens=32, stop=["4"])
        )
        events = [event async for event in running.chat.Complete(request)]
    assert "1 2 3 " == "".join(e.delta.text for e in events if e.HasField("delta"))
    assert chat_pb2.FINISH_REASON_STOP == events[-1].finished.finish_reason
