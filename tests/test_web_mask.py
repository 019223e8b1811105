"""The edit tab's mask brush in headless Chromium: paint with the mouse over the first
reference image, submit, and the job is a masked edit whose result differs inside
the painted stroke and matches the upload outside it; erase and clear."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from .servers import RunningServer, stub_settings
from .test_api import wait_done
from .web_fixtures import PageGuard, browser, expect, guard, page, shot  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def web_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(stub_settings(default_width=256, default_height=256, max_images=4))


def noisy_png(w: int = 96, h: int = 96) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue(), pixels.astype(np.int16)


def upload(page: Any, data: bytes) -> Any:
    page.get_by_label("Edit", exact=True).check()
    page.get_by_label("Add reference images").set_input_files([{"name": "photo.png", "mimeType": "image/png", "buffer": data}])
    canvas = page.get_by_role("img", name="Mask: paint the area to edit")
    expect(canvas).to_be_visible()
    expect(canvas).to_have_js_property("width", 96)
    return canvas


def drag(page: Any, box: dict[str, float], points: list[tuple[float, float]]) -> None:
    """A mouse stroke through ``points`` given as fractions of the canvas."""
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=6)
    page.mouse.up()


def submit(page: Any, prompt: str) -> dict[str, Any]:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    with page.expect_request(lambda r: r.url.endswith("/api/edit")) as req:
        page.get_by_role("button", name="Generate", exact=True).click()
    return json.loads(req.value.post_data)  # type: ignore[no-any-return]


def result(page: Any, srv: RunningServer, prompt: str) -> np.ndarray:
    card = page.locator("#gallery .card").filter(has_text=prompt)
    expect(card).to_have_count(1)
    task_id = card.get_attribute("data-task-id")
    assert wait_done(srv.client, task_id)["status"] == "done"
    img = Image.open(io.BytesIO(srv.client.get("/api/image", params={"task_id": task_id}).content))
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_painting_a_mask_sends_a_masked_edit_that_changes_only_the_stroke(page: Any, web_server: RunningServer) -> None:
    data, pixels = noisy_png()
    canvas = upload(page, data)
    page.get_by_label("Brush size").fill("40")
    box = canvas.bounding_box()
    drag(page, box, [(0.2, 0.5), (0.5, 0.5), (0.8, 0.5)])  # a horizontal stroke across the middle
    page.get_by_label("Erase").check()
    drag(page, box, [(0.75, 0.3), (0.75, 0.7)])  # erased again near its right end
    shot(page, "web-mask-brush")
    body = submit(page, "paint a river")
    assert body["mask"].startswith("data:image/png;base64,") and body["mask_blur"] == 4
    out = result(page, web_server, "paint a river")
    assert out.shape == pixels.shape
    diff = np.abs(out - pixels).max(axis=2)
    assert diff[44:52, 30:60].mean() > 8 and (diff[44:52, 30:60] > 0).mean() > 0.9  # inside the stroke: repainted
    assert diff[:24, :].max() == 0 and diff[-24:, :].max() == 0  # far from it: the upload's own pixels
    assert diff[40:56, 70:74].max() == 0  # erased: kept


def test_a_cleared_mask_sends_a_whole_image_edit(page: Any) -> None:
    data, _ = noisy_png()
    canvas = upload(page, data)
    drag(page, canvas.bounding_box(), [(0.3, 0.3), (0.6, 0.6)])
    page.get_by_role("button", name="Clear mask").click()
    body = submit(page, "no mask")
    assert "mask" not in body and len(body["images"]) == 1
