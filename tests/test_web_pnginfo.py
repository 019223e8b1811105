"""The web UI's "Settings from an image" in headless Chromium: a result file chosen
or dropped fills the compose form through POST /api/png-info."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from .servers import RunningServer, stub_settings
from .test_api import wait_done
from .web_fixtures import PageGuard, browser, expect, guard, page, shot  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def web_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(stub_settings(default_width=64, default_height=64))


def result_file(srv: RunningServer, fmt: str = "PNG", **body: Any) -> bytes:
    r = srv.client.post("/api/generate", json={"format": fmt, **body})
    st = wait_done(srv.client, r.json()["task_id"])
    assert st["status"] == "done", st
    return srv.client.get("/api/image", params={"task_id": st["task_id"]}).content


def test_choosing_a_result_file_fills_the_form(page: Any, web_server: RunningServer) -> None:
    data = result_file(web_server, prompt="a lighthouse at dusk", negative_prompt="fog", seed=4242, steps=3,
                       guidance=6.5, width=128, height=64)  # fmt: skip
    page.get_by_label("Fill the form from an image's settings").set_input_files(
        {"name": "result.png", "mimeType": "image/png", "buffer": data}
    )
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a lighthouse at dusk")
    expect(page.locator("#negative-prompt")).to_have_value("fog")
    expect(page.locator("#seed")).to_have_value("4242")
    expect(page.locator("#steps")).to_have_value("3")
    expect(page.locator("#guidance")).to_have_value("6.5")
    expect(page.locator("#width")).to_have_value("128")
    expect(page.locator("#height")).to_have_value("64")
    expect(page.locator("#toasts")).to_contain_text("seed 4242")
    shot(page, "web-png-info")


def test_dropping_a_jpeg_fills_the_form_and_a_bare_image_says_so(page: Any, web_server: RunningServer) -> None:
    data = result_file(web_server, "JPEG", prompt="a snowy owl", seed=77)
    page.evaluate(
        """async (b64) => {
             const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
             const dt = new DataTransfer();
             dt.items.add(new File([bytes], "owl.jpg", { type: "image/jpeg" }));
             document.querySelector("#png-info-drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
           }""",
        base64.b64encode(data).decode(),
    )
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a snowy owl")
    expect(page.locator("#seed")).to_have_value("77")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    page.get_by_label("Fill the form from an image's settings").set_input_files(
        {"name": "plain.png", "mimeType": "image/png", "buffer": buf.getvalue()}
    )
    expect(page.locator("#toasts")).to_contain_text("plain.png carries no generation settings")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a snowy owl")  # left as it was
