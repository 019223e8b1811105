"""The web front-end with API keys configured (headless Chromium): the key from
Settings goes with every API call, gallery images and Download links use the
signed ``url`` of each status (an <img> or a download cannot send the key), and
an unsigned link is refused."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from .servers import RunningServer, stub_settings
from .web_fixtures import TIMEOUT_MS, PageGuard, browser, expect, guard, shot  # noqa: F401  (fixtures)

KEY = "web-test-key"


@pytest.fixture(scope="module")
def web_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    settings = stub_settings(default_width=128, default_height=128)
    settings["auth"] = {"api_keys": [{"key": KEY, "name": "alice"}]}
    return server_factory(settings)


@pytest.fixture
def keyed_page(browser: Any, web_server: RunningServer, guard: PageGuard) -> Iterator[Any]:
    """The page with the key already saved in Settings (as a user who typed it once)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    ctx.add_init_script(f"localStorage.setItem('easel.apiKey', {KEY!r})")
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.on("console", guard.on_console)
    pg.on("pageerror", lambda exc: guard.errors.append(f"uncaught: {exc}"))
    pg.on("request", guard.on_request)
    failed: list[str] = []
    pg.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    pg.goto(web_server.url + "/")
    pg.wait_for_selector("body[data-ready]")
    yield pg
    ctx.close()
    assert failed == [], f"requests refused: {failed}"
    assert guard.errors == [], f"console errors: {guard.errors}"
    assert guard.offsite == [], f"requests left loopback: {guard.offsite}"


def test_with_keys_on_the_gallery_shows_the_image_and_download_saves_it(keyed_page: Any, web_server: RunningServer) -> None:
    page = keyed_page
    page.get_by_label("Prompt", exact=True).fill("a keyed lighthouse")
    page.get_by_role("button", name="Generate", exact=True).click()
    card = page.locator("#gallery .card").filter(has_text="a keyed lighthouse")
    expect(card).to_have_count(1)
    img = card.locator("img")
    expect(img).to_have_js_property("complete", True)
    assert img.evaluate("img => img.naturalWidth") == 128  # a 401 would be a broken image (0)
    src = img.get_attribute("src")
    assert src is not None and "sig=" in src and src.startswith("/api/image?")
    shot(page, "web-keys-gallery")
    with page.expect_download() as info:
        card.locator(".download").click()
    download = info.value
    assert download.failure() is None
    data = open(download.path(), "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert download.suggested_filename.endswith(".png")
    # the same link without its signature (what the page built before) is refused
    unsigned = src.split("&expires=")[0]
    assert httpx.get(web_server.url + unsigned).status_code == 401
