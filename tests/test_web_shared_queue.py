"""The web front-end's Queue panel shared between keys, and the admin's pause
(headless Chromium): an admin pauses a model from the Models panel; a key's page
lists another key's queued job as "Another user's job" without its prompt (no
cancel button, no stream), an admin's page with it; on resume the job runs and
leaves both queues."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from .servers import RunningServer, stub_settings
from .web_fixtures import TIMEOUT_MS, PageGuard, browser, expect, guard, open_ready, shot  # noqa: F401  (fixtures)

SECRET = "alice's secret lighthouse"
KEYS = {"alice": "alice-key", "bob": "bob-key", "root": "root-key"}


@pytest.fixture(scope="module")
def web_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    settings = stub_settings(default_width=128, default_height=96)
    settings["auth"] = {"api_keys": [{"key": KEYS["alice"], "name": "alice"}, {"key": KEYS["bob"], "name": "bob"}],
                        "admin_keys": [{"key": KEYS["root"], "name": "root"}]}  # fmt: skip
    return server_factory(settings)


@pytest.fixture
def open_page(browser: Any, web_server: RunningServer, guard: PageGuard) -> Iterator[Callable[[str], Any]]:
    """``open_page(who)``: the page with that key saved in Settings."""
    contexts = []

    def make(who: str) -> Any:
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        ctx.add_init_script(f"localStorage.setItem('easel.apiKey', {KEYS[who]!r})")
        contexts.append(ctx)
        return open_ready(ctx, web_server.url, guard)

    yield make
    for ctx in contexts:
        ctx.close()
    assert guard.errors == [], f"console errors: {guard.errors}"
    assert guard.offsite == [], f"requests left loopback: {guard.offsite}"


def test_an_admin_pauses_from_the_models_panel_and_others_see_the_queue_without_the_prompt(open_page: Callable[[str], Any], web_server: RunningServer) -> None:
    root = open_page("root")
    root.locator("#models-panel summary").click()
    root.get_by_role("button", name="Pause the queue of stub").click()
    expect(root.get_by_role("button", name="Resume the queue of stub")).to_be_visible()
    expect(root.locator("#models-body")).to_contain_text("(paused)")
    models = web_server.client.get("/v1/admin/models", headers={"Authorization": f"Bearer {KEYS['root']}"}).json()["models"]
    assert models[0]["paused"] is True

    with httpx.Client(base_url=web_server.url, headers={"Authorization": f"Bearer {KEYS['alice']}"}) as alice:
        r = alice.post("/api/generate", json={"prompt": SECRET})
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]

    bob = open_page("bob")
    row = bob.locator(f'#queue li[data-task-id="{task_id}"]')
    expect(row).to_have_count(1)
    expect(row.locator(".job-title")).to_have_text("Another user's job on stub · 128×96")
    expect(row.locator(".eta")).to_have_text("paused")
    expect(row.locator(".cancel")).to_be_hidden()
    assert SECRET not in bob.content()
    shot(bob, "web-shared-queue-private")

    root.reload()
    root.wait_for_selector("body[data-ready]")
    admin_row = root.locator(f'#queue li[data-task-id="{task_id}"]')
    expect(admin_row.locator(".job-title")).to_have_text(SECRET)
    expect(admin_row.locator(".eta")).to_have_text("paused")
    root.locator("#models-panel summary").click()
    root.get_by_role("button", name="Resume the queue of stub").click()
    expect(root.get_by_role("button", name="Pause the queue of stub")).to_be_visible()
    expect(row).to_have_count(0)  # it ran: gone from bob's queue, and not in his Finished list
    expect(bob.locator(f'#finished li[data-task-id="{task_id}"]')).to_have_count(0)
    assert SECRET not in bob.content()
