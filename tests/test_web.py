"""The web front-end in headless Chromium (Debian's /usr/bin/chromium through
Playwright): generate, live progress and ETA, cancel, edit with uploads, field
errors.  Every test also asserts no console errors and no request off loopback
(fixtures in web_fixtures.py).  Screenshots go to test-artifacts/."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from .servers import RunningServer, stub_settings
from .web_fixtures import PageGuard, browser, expect, guard, page, queue_item, shot  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def web_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """256x256 by default; 1 s per step per megapixel -> ~0.065 s a step."""
    return server_factory(stub_settings(simulate_step_seconds=1.0, default_width=256, default_height=256, max_images=4))


def png_bytes(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), color).save(buf, "PNG")
    return buf.getvalue()


def submit(page: Any, prompt: str, **fields: str) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    for label, value in fields.items():
        page.get_by_label(label.replace("_", " "), exact=True).fill(value)
    page.get_by_role("button", name="Generate", exact=True).click()


def test_generate_shows_the_images_in_the_gallery(page: Any) -> None:
    submit(page, "a lighthouse at dusk", Image_count="2", Steps="2")
    cards = page.locator("#gallery .card").filter(has_text="a lighthouse at dusk")
    expect(cards).to_have_count(2)
    expect(cards.first.locator("img")).to_have_js_property("complete", True)
    assert cards.first.locator("img").evaluate("img => img.naturalWidth") == 256
    expect(cards.first).to_contain_text("seed")
    shot(page, "web-gallery")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "web-gallery-mobile")
    page.set_viewport_size({"width": 1280, "height": 860})
    cards.first.get_by_role("button", name=re.compile("^Enlarge")).click()
    dialog = page.get_by_role("dialog", name="Image preview")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("a lighthouse at dusk")
    shot(page, "web-lightbox")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()


def test_progress_bar_moves_and_eta_falls_while_a_job_runs(page: Any) -> None:
    submit(page, "slow progress", Steps="40")
    job = queue_item(page, "running")
    bar = job.get_by_role("progressbar")
    expect(bar).not_to_have_attribute("aria-valuenow", "0")
    first = int(bar.get_attribute("aria-valuenow"))
    eta = float(job.locator(".eta").get_attribute("data-seconds"))
    page.wait_for_function(
        """([first, eta]) => {
             const job = document.querySelector('#queue li[data-status=running]');
             if (!job) return false;
             const now = +job.querySelector('.bar').getAttribute('aria-valuenow');
             return now > first && +job.querySelector('.eta').dataset.seconds < eta;
           }""",
        arg=[first, eta],
    )
    shot(page, "web-progress")
    expect(page.locator("#gallery .card").filter(has_text="slow progress")).to_have_count(1)


def test_a_running_jobs_card_shows_a_live_preview_before_it_is_done(page: Any) -> None:
    submit(page, "live preview", Steps="40")  # ~0.065 s a step: ~2.6 s
    job = queue_item(page, "running")
    expect(job).to_have_count(1)
    page.wait_for_function(
        """() => {
             const job = document.querySelector('#queue li[data-status=running]');
             const img = job && job.querySelector('img.job-preview');
             return !!img && !img.hidden && img.complete && img.naturalWidth > 0;
           }"""
    )
    preview = job.locator("img.job-preview")
    assert preview.evaluate("img => img.src").startswith("data:image/jpeg;base64,")
    assert preview.evaluate("img => img.naturalWidth") == 256  # at most 256 px a side
    assert 0 < int(preview.get_attribute("data-step")) < 40
    expect(preview).to_have_attribute("alt", re.compile("^Preview of live preview at step"))
    shot(page, "web-live-preview")
    expect(page.locator("#gallery .card").filter(has_text="live preview")).to_have_count(1)
    done = page.locator("#queue li[data-status=done]").filter(has_text="live preview")
    if done.count():  # finished jobs leave the queue after a few seconds
        expect(done.locator("img.job-preview")).to_be_hidden()


def test_cancel_a_queued_job(page: Any, web_server: RunningServer) -> None:
    submit(page, "long running job", Steps="200")
    expect(queue_item(page, "running")).to_have_count(1)
    submit(page, "queued job")
    queued = queue_item(page, "waiting")
    expect(queued).to_contain_text("queued job")
    expect(queued).to_contain_text("1 job ahead")
    task_id = queued.get_attribute("data-task-id")
    shot(page, "web-queue")
    queued.get_by_role("button", name=re.compile("^Cancel job")).click()
    expect(page.locator(f'#queue li[data-task-id="{task_id}"]')).to_have_attribute("data-status", "cancelled")
    assert web_server.client.get("/api/status", params={"task_id": task_id}).json()["status"] == "cancelled"
    queue_item(page, "running").get_by_role("button", name=re.compile("^Cancel job")).click()
    expect(queue_item(page, "running")).to_have_count(0)


def test_edit_with_two_uploaded_reference_images(page: Any, web_server: RunningServer) -> None:
    page.get_by_label("Edit", exact=True).check()
    page.get_by_label("Add reference images").set_input_files([
        {"name": "red.png", "mimeType": "image/png", "buffer": png_bytes("red")},
        {"name": "blue.png", "mimeType": "image/png", "buffer": png_bytes("blue")},
    ])
    thumbs = page.get_by_role("list", name="Reference images").get_by_role("listitem")
    expect(thumbs).to_have_count(2)
    expect(page.get_by_role("button", name="Remove reference 2 (blue.png)")).to_be_visible()
    shot(page, "web-edit-refs")
    submit(page, "make it pop")
    card = page.locator("#gallery .card").filter(has_text="make it pop")
    expect(card).to_have_count(1)
    status = web_server.client.get("/api/status", params={"task_id": card.get_attribute("data-task-id")}).json()
    assert status["task"] == "edit"
    card.get_by_role("button", name=re.compile("as reference$")).click()
    expect(thumbs).to_have_count(3)


def test_server_errors_are_shown_next_to_their_field(page: Any, guard: PageGuard) -> None:
    guard.allowed.append(re.compile(r"status of 400"))  # the refused request is logged by Chromium
    page.get_by_label("Width", exact=True).fill("1000")
    submit(page, "bad width")
    field = page.locator(".field[data-param=width]")
    expect(field.get_by_role("alert")).to_contain_text("multiple of 16")
    expect(page.get_by_label("Width", exact=True)).to_have_attribute("aria-invalid", "true")
    shot(page, "web-field-error")
