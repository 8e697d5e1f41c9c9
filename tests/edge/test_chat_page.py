"""The chat page in a real headless browser (Debian's Chromium, driven by Playwright).

The page is the one the example server serves: built from examples/web_chat by
scripts/build-web, talking to a live gateway through clients generated from protos/
over the Connect protocol. Without Chromium, Node.js or Playwright the tests skip,
unless ``TOKENWIRE_TEST_REQUIRE_SERVICES`` is set (CI): then they fail. Screenshots
go to ``build/test-artifacts/`` (or ``$TOKENWIRE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REQUIRE_SERVICES, services_required
from tokenwire.auth.config import AuthConfig
from tokenwire.auth.keys import make_principal
from tokenwire.edge.config import HttpConfig
from tokenwire.edge.page import CHAT_PAGE_DIR
from tokenwire.moderation.config import ModerationConfig
from tokenwire.stores.sqlite import SQLiteConversationStore
from tokenwire.testing import FakeBackend, RunningServer, config_for_tests, running_server

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("TOKENWIRE_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TOKENWIRE_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
# Long and slow enough (about 2 s) that a stop lands mid-answer.
SLOW_REPLY = "The capital of France is Paris, a city on the Seine known for its museums and cafes."
FLAGGED_REPLY = "Sure. Here it is: I will kill you now, said the villain."
# The flags a sandboxed, offline machine needs (no background calls to the network).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _require(problem: str | None) -> None:
    if problem is None:
        return
    if services_required():
        pytest.fail(f"{problem}; {REQUIRE_SERVICES} is set (run scripts/install-clients)")
    pytest.skip(f"{problem}; scripts/install-clients installs what is missing")


def _chromium_problem() -> str | None:
    return None if Path(CHROMIUM).is_file() else f"no Chromium at {CHROMIUM}"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """One headless Chromium for the module."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _require("playwright is not installed (scripts/install dev installs it)")
    _require(await asyncio.to_thread(_chromium_problem))
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@dataclasses.dataclass
class Gateway:
    running: RunningServer
    backend: FakeBackend
    store: SQLiteConversationStore
    key: str
    url: str


@asynccontextmanager
async def _gateway(backend: FakeBackend, **sections: Any) -> AsyncIterator[Gateway]:
    """A gateway with auth on, its HTTP edge serving the page, and one user's API key."""
    config = config_for_tests(
        http=HttpConfig(enabled=True, listen="127.0.0.1:0"),
        auth=AuthConfig(enabled=True, api_keys=True),
        **sections,
    )
    store = SQLiteConversationStore(":memory:")
    async with running_server(backend, config, store=store) as running:
        assert running.server.http is not None
        keys = running.server.pipeline.auth.key_store  # type: ignore[union-attr]
        issued = await keys.create_key(make_principal("acme", "ann"))
        url = f"http://127.0.0.1:{running.server.http.port}/"
        yield Gateway(running, backend, store, issued.secret, url)


async def _screenshot(page: Any, name: str) -> None:
    await asyncio.to_thread(ARTIFACTS.mkdir, parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / name), full_page=True)


async def _wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def test_the_built_page_matches_its_source() -> None:
    """The committed assets are what scripts/build-web builds from examples/web_chat now."""
    _require(None if shutil.which("npm") else "Node.js and npm are not installed")
    check = subprocess.run(
        [str(ROOT / "scripts" / "build-web"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert 0 == check.returncode, check.stderr


async def test_the_page_is_served_with_a_strict_policy() -> None:
    """GET / serves the page, its script under /static/, with a same-origin-only CSP."""
    import httpx2 as httpx

    async with _gateway(FakeBackend()) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        page = await client.get("/")
        script = await client.get("/static/app.js")
    assert (200, 200) == (page.status_code, script.status_code)
    assert "static/app.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert (CHAT_PAGE_DIR / "app.js").read_bytes() == script.content


async def test_sign_in_ask_stop_ask_again_and_find_it_after_a_reload(browser: Any) -> None:
    """The whole session: a wrong key refused, answers streamed, stop cancels the engine."""
    backend = FakeBackend(reply=SLOW_REPLY, token_delay_s=0.025)
    async with _gateway(backend, moderation=ModerationConfig(enabled=False)) as gw:
        context = await browser.new_context(viewport={"width": 1100, "height": 700})
        page = await context.new_page()
        await page.goto(gw.url)
        await page.fill("#api-key", "tw_wrong")
        await page.click("#sign-in-button")
        await page.wait_for_selector("#sign-in-error:has-text('Not signed in')")

        await page.fill("#api-key", gw.key)
        await page.click("#sign-in-button")
        await page.wait_for_selector("#app:not([hidden])")
        assert "fake" == await page.text_content("#model")

        # Ask, watch the answer grow, and stop it halfway.
        await page.fill("#prompt", "What is the capital of France?")
        await page.click("#send")
        answer = page.locator(".message.assistant").last
        # (a locator, not wait_for_function: the page's CSP forbids evaluating strings)
        await page.locator(".message.assistant .text", has_text=re.compile(r"^.{12}")).wait_for()
        await page.click("#stop")
        await page.wait_for_selector(".message.assistant[data-done] .note:has-text('stopped')")
        shown = await answer.locator(".text").text_content()
        assert shown is not None
        assert 0 < len(shown) < len(SLOW_REPLY)
        assert SLOW_REPLY.startswith(shown)
        # The engine stopped within a step or two of the abort, not at the end of the reply.
        await _wait_until(lambda: 0 == backend.running)
        stopped = backend.requests[0]
        assert stopped.closed
        assert stopped.tokens_sent < len(SLOW_REPLY) - 10

        # Ask again in the same conversation: a whole answer this time.
        await page.fill("#prompt", "And of Italy?")
        await page.press("#prompt", "Enter")
        await page.wait_for_selector(".message.assistant[data-done] >> nth=1")
        assert SLOW_REPLY == await answer.locator(".text").text_content()
        await _screenshot(page, "chat_page.png")

        # Reload: still signed in, the conversation listed, its turns stored as shown.
        await page.reload()
        await page.wait_for_selector("#conversations li")
        titles = await page.locator("#conversations li").all_text_contents()
        assert 1 == len(titles)
        await page.click("#conversations li")
        await page.wait_for_selector(".message >> nth=3")
        first, stopped_text, second, answered = await page.locator(
            ".message .text"
        ).all_text_contents()
        assert ("What is the capital of France?", "And of Italy?") == (first, second)
        assert SLOW_REPLY == answered
        # Stored is what the gateway sent before the cancel reached it: the shown text,
        # plus at most the few tokens that were on the wire when the fetch was aborted.
        assert stopped_text.startswith(shown)
        assert SLOW_REPLY.startswith(stopped_text)
        assert "(incomplete)" in (await page.locator(".message").nth(1).text_content() or "")
        await _screenshot(page, "chat_page_reloaded.png")
        await context.close()


async def test_an_answer_cut_by_moderation_is_shown_as_such(browser: Any) -> None:
    """The flagged text never reaches the page; the answer is marked as stopped by moderation."""
    async with _gateway(FakeBackend(reply=FLAGGED_REPLY)) as gw:
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(gw.url)
        await page.fill("#api-key", gw.key)
        await page.click("#sign-in-button")
        await page.fill("#prompt", "Tell me a story.")
        await page.click("#send")
        await page.wait_for_selector(".message.assistant.filtered[data-done]")
        shown = await page.locator(".message.assistant .text").text_content()
        note = await page.locator(".message.assistant .note").text_content()
        await _screenshot(page, "chat_page_moderated.png")
        await context.close()
    assert shown is not None
    assert "kill" not in shown
    assert note is not None
    assert note.startswith("Stopped by moderation")
