"""Browser fixtures shared by the web tests: headless Chromium (Debian's
/usr/bin/chromium through Playwright) and a page that fails its test on any
console error or request off loopback.  A test module imports these and
defines a ``web_server`` fixture for ``page`` to open."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from .servers import ROOT, RunningServer

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("web tests need Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="web tests need the playwright Python package")
expect = sync_api.expect

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


class PageGuard:
    """Collects console errors and the hosts of every request."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.offsite: list[str] = []
        self.allowed: list[re.Pattern[str]] = []

    def on_console(self, msg: Any) -> None:
        if msg.type == "error" and not any(p.search(msg.text) for p in self.allowed):
            self.errors.append(msg.text)

    def on_request(self, req: Any) -> None:
        url = urlparse(req.url)
        if url.scheme not in ("data", "blob") and url.hostname not in LOOPBACK:
            self.offsite.append(req.url)


@pytest.fixture
def guard() -> PageGuard:
    return PageGuard()


@pytest.fixture
def page(browser: Any, web_server: RunningServer, guard: PageGuard) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    yield open_ready(ctx, web_server.url, guard)
    ctx.close()


def open_ready(ctx: Any, url: str, guard: PageGuard) -> Any:
    """A new page of ``ctx`` on the web UI at ``url``, watched by ``guard``, once the app is ready."""
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.on("console", guard.on_console)
    pg.on("pageerror", lambda exc: guard.errors.append(f"uncaught: {exc}"))
    pg.on("request", guard.on_request)
    pg.goto(url + "/")
    pg.wait_for_selector("body[data-ready]")
    return pg
    assert guard.errors == [], f"console errors: {guard.errors}"
    assert guard.offsite == [], f"requests left loopback: {guard.offsite}"


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def queue_item(page: Any, status: str) -> Any:
    return page.locator(f"#queue li[data-status={status}]")
