"""The web UI's Content-Security-Policy (server/csp.py): sent with the page and its
assets, satisfied by them in headless Chromium (no ``securitypolicyviolation``, no
console error) through a generate and an edit with uploaded references; not sent
with JSON API responses, nor with /swagger."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from server.csp import WEB_UI_CSP

from .servers import RunningServer, stub_settings
from .web_fixtures import TIMEOUT_MS, PageGuard, browser, expect  # noqa: F401  (fixtures)

RECORD_VIOLATIONS = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(`${e.violatedDirective} blocked ${e.blockedURI || "inline"} (${e.sourceFile}:${e.lineNumber})`));
"""


@pytest.fixture(scope="module")
def web_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(stub_settings(default_width=128, default_height=128, max_images=4))


def png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), color).save(buf, "PNG")
    return buf.getvalue()


def test_policy_is_on_the_page_and_its_assets_only(web_server: RunningServer) -> None:
    c = web_server.client
    for path in ("/", "/app.js", "/js/api.js", "/style.css", "/favicon.svg"):
        r = c.get(path)
        assert r.status_code == 200 and r.headers["content-security-policy"] == WEB_UI_CSP, path
        assert "'unsafe-inline'" not in r.headers["content-security-policy"]
    for path in ("/v1/models", "/api/models", "/openapi.json", "/swagger", "/healthz"):
        assert "content-security-policy" not in c.get(path).headers, path


def test_the_page_satisfies_its_policy(browser: Any, web_server: RunningServer) -> None:
    guard = PageGuard()
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    ctx.add_init_script(RECORD_VIOLATIONS)
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", guard.on_console)
    page.on("pageerror", lambda exc: guard.errors.append(f"uncaught: {exc}"))
    try:
        response = page.goto(web_server.url + "/")
        assert response is not None and response.headers["content-security-policy"] == WEB_UI_CSP
        page.wait_for_selector("body[data-ready]")

        page.get_by_label("Prompt", exact=True).fill("a policy-abiding fox")
        page.get_by_role("button", name="Generate", exact=True).click()
        card = page.locator("#gallery .card").filter(has_text="a policy-abiding fox")
        expect(card.locator("img")).to_have_js_property("complete", True)

        page.get_by_label("Edit", exact=True).check()  # references preview as data: URLs
        page.get_by_label("Add reference images").set_input_files(
            [{"name": "red.png", "mimeType": "image/png", "buffer": png("red")}]
        )
        expect(page.get_by_role("list", name="Reference images").get_by_role("listitem")).to_have_count(1)
        page.get_by_label("Prompt", exact=True).fill("an edit under the policy")
        page.get_by_role("button", name="Generate", exact=True).click()  # the one submit button
        edited = page.locator("#gallery .card").filter(has_text="an edit under the policy")
        expect(edited.locator("img")).to_have_js_property("complete", True)

        assert page.evaluate("window.__csp") == []
        assert guard.errors == [], f"console errors: {guard.errors}"
    finally:
        ctx.close()
