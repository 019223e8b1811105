"""The web front-end's labels for work it did not submit itself (headless Chromium):
a batch's cards say the steps of each image, not the batch's total; the Queue
panel lists finished jobs instead of saying "No jobs yet."."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from .servers import RunningServer, stub_settings
from .test_api import wait_done
from .web_fixtures import PageGuard, browser, expect, guard, page, shot  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def web_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(stub_settings(default_width=128, default_height=128))


def test_a_batch_is_labelled_by_the_steps_of_each_image_and_listed_as_finished(page: Any, web_server: RunningServer) -> None:
    c = web_server.client
    r = c.post("/api/generate", json={"prompts": ["batch fox", "batch owl", "batch elk"], "steps": 4})
    st = wait_done(c, r.json()["task_id"])
    assert st["total_steps"] == 12 and [img["steps"] for img in st["images"]] == [4, 4, 4]
    page.reload()
    page.wait_for_selector("body[data-ready]")
    cards = page.locator("#gallery .card").filter(has_text="batch ")
    expect(cards).to_have_count(3)
    for i in range(3):
        expect(cards.nth(i).locator(".card-meta")).to_contain_text("steps 4")
        expect(cards.nth(i).locator(".card-meta")).not_to_contain_text("steps 12")
    finished = page.locator("#finished li")
    expect(finished.filter(has_text="batch ")).to_have_count(1)
    expect(page.locator("#queue-empty")).to_have_text("Nothing queued or running.")
    shot(page, "web-finished-list")


def test_a_job_that_leaves_the_queue_goes_to_the_finished_list(page: Any) -> None:
    page.get_by_label("Prompt", exact=True).fill("a heron at dawn")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#gallery .card").filter(has_text="a heron at dawn")).to_have_count(1)
    expect(page.locator("#finished li[data-status=done]").filter(has_text="a heron at dawn")).to_have_count(1)
    expect(page.locator("#queue li")).to_have_count(0)
    expect(page.locator("#queue-empty")).to_be_visible()
    expect(page.locator("#queue-empty")).not_to_have_text("No jobs yet.")


def test_the_arrows_move_a_queued_job_to_the_front_of_the_queue(page: Any, web_server: RunningServer) -> None:
    c = web_server.client
    held = c.post("/api/generate", json={"prompt": "hang", "steps": 1}).json()["task_id"]
    c.get("/api/status", params={"task_id": held, "wait": 10, "since": "waiting"})
    first, second = (c.post("/api/generate", json={"prompt": p, "steps": 1}).json()["task_id"] for p in ("queued kite", "queued lark"))
    page.reload()
    page.wait_for_selector("body[data-ready]")
    lark = page.locator(f'#queue li[data-task-id="{second}"]')
    expect(lark.locator(".pos")).to_have_text("2 jobs ahead")
    front = lark.locator('.move[data-to="front"]')
    expect(front).to_have_attribute("aria-label", re.compile(r"^Move job .+ to the front$"))
    front.click()
    expect(lark.locator(".pos")).to_have_text("1 job ahead")
    expect(page.locator(f'#queue li[data-task-id="{first}"] .pos')).to_have_text("2 jobs ahead")
    assert c.get("/api/status", params={"task_id": second}).json()["pos"] == 1
    expect(lark.locator('.move[data-to="back"]')).to_be_visible()
    c.post("/api/cancel", params={"task_id": held, "wait": 0})
    for task_id in (first, second):
        wait_done(c, task_id)
    expect(lark.locator(".move").first).to_be_hidden()
