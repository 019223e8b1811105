"""easel's Gradio front-end (clients/gradio_app.py), live: a real easel server and the
real Gradio app in subprocesses, driven by ``gradio_client`` and headless Chromium.
Needs ``requirements-gradio.txt`` (scripts/test.sh installs it); skipped without it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageStat

from .servers import ROOT, RunningServer, free_port, stub_settings

pytest.importorskip("gradio", reason="the Gradio tests need requirements-gradio.txt (pip install -r requirements-gradio.txt)")
gradio_client = pytest.importorskip("gradio_client")

STEPS = 40  # the UI's default steps (the model's recommended_steps): ~0.13 s a step at 256x256


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # start-up poll: there is no event to await across processes
    proc.kill()
    raise RuntimeError(f"{url} did not start:\n{log.read_text(errors='replace')}")


def start_app(tmp: Path, command: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A Gradio app (``command``, listening on ``port``) run from ``tmp``, once it answers."""
    log = tmp / f"gradio-{port}.log"
    proc = subprocess.Popen(
        command,
        cwd=tmp,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp / "gradio-tmp"),
             "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})},  # fmt: skip
    )
    wait_http(f"http://127.0.0.1:{port}/", proc, log)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def easel(server_factory: Callable[..., RunningServer]) -> RunningServer:
    settings = stub_settings(simulate_step_seconds=2.0, default_width=256, default_height=256, recommended_steps=STEPS)
    settings["queue"] = {"capacity": 1}  # one waiting job fills the queue: the 429 test needs it
    return server_factory(settings)


@pytest.fixture(scope="module")
def app_url(easel: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("gradio-app")
    port = free_port()
    proc = start_app(tmp, [sys.executable, "-m", "clients.gradio_app", "--server", easel.url, "--port", str(port)], port)
    yield f"http://127.0.0.1:{port}/"
    stop(proc)


@pytest.fixture
def client(app_url: str, tmp_path: Path) -> Any:
    return gradio_client.Client(app_url, verbose=False, download_files=str(tmp_path))


def recent(easel: RunningServer, task_id: str) -> dict[str, Any]:
    tasks = easel.client.get("/api/tasks").json()
    return next(t for t in tasks["queue"] + tasks["recent"] if t["task_id"] == task_id)


@pytest.mark.timeout(120)
def test_generate_api_returns_the_image_and_the_job_is_easels(client: Any, easel: RunningServer) -> None:
    path = client.predict("a red fox", 256, 256, 4, 7, api_name="/generate")
    with Image.open(path) as img:
        assert img.size == (256, 256)
    tasks = easel.client.get("/api/tasks").json()
    mine = [t for t in tasks["recent"] if t["seed"] == 7 and t["images"] and t["images"][0]["prompt"] == "a red fox"]
    assert mine and mine[0]["status"] == "done" and mine[0]["total_steps"] == 4, tasks


@pytest.mark.timeout(120)
def test_the_api_endpoint_takes_exactly_five_inputs(client: Any) -> None:
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]
    assert [p["parameter_name"] for p in api["parameters"]] == ["prompt", "width", "height", "steps", "seed"]
    assert len(api["returns"]) == 1


@pytest.mark.timeout(120)
def test_an_easel_4xx_reaches_the_client_with_easels_message(client: Any, easel: RunningServer) -> None:
    direct = easel.client.post("/api/generate", json={"prompt": "huge", "width": 2048, "height": 2048, "steps": 4})
    assert direct.status_code == 400
    message = direct.json()["error"]["message"]
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict("huge", 2048, 2048, 4, 7, api_name="/generate")
    assert message in str(err.value) and "400" in str(err.value)


@pytest.mark.timeout(120)
def test_a_failed_job_shows_its_message(client: Any) -> None:
    with pytest.raises(gradio_client.exceptions.AppError, match="asked to fail"):
        client.predict("fail", 256, 256, 2, 1, api_name="/generate")


@pytest.mark.timeout(120)
def test_a_full_queue_shows_429_with_retry_after(client: Any, easel: RunningServer) -> None:
    c = easel.client
    running = c.post("/api/generate", json={"prompt": "ahead", "steps": STEPS}).json()["task_id"]
    assert c.get("/api/status", params={"task_id": running, "wait": 10, "since": "waiting"}).json()["status"] == "running"
    waiting = c.post("/api/generate", json={"prompt": "waiting", "steps": STEPS}).json()["task_id"]
    try:
        refused = c.post("/api/generate", json={"prompt": "refused"})
        assert refused.status_code == 429 and refused.headers.get("retry-after")
        with pytest.raises(gradio_client.exceptions.AppError) as err:
            client.predict("one more", 256, 256, 4, 7, api_name="/generate")
        assert "429" in str(err.value) and "Retry after" in str(err.value)
        assert refused.json()["error"]["message"] in str(err.value)
    finally:
        for task_id in (waiting, running):
            c.delete(f"/api/tasks/{task_id}")


@pytest.mark.timeout(120)
def test_cancel_from_the_app_cancels_the_easel_job(client: Any, easel: RunningServer) -> None:
    job = client.submit("slow", "", "stub", 256, 256, STEPS, None, -1, 1, None, False, api_name="/run")
    task_id = None
    for task_id, progress, *_ in job:  # noqa: B007  (one update per status change, from easel's events)
        if "data-status='running'" in progress:
            break
    assert task_id
    assert recent(easel, task_id)["status"] == "running"
    assert "cancel" in client.predict(task_id, api_name="/cancel")
    final = easel.client.get("/api/status", params={"task_id": task_id, "wait": 10, "since": "running"}).json()
    assert final["status"] == "cancelled" and final["step"] < STEPS
    task_out, progress, *_ = job.result(timeout=30)
    assert task_out == task_id and "data-status='cancelled'" in progress


@pytest.mark.timeout(180)
def test_screenshot_mid_job_shows_progress_and_the_cancel_button_cancels(app_url: str, easel: RunningServer) -> None:
    from .web_fixtures import ARGS, ARTIFACTS, CHROMIUM, expect, sync_api  # skips without Chromium/Playwright

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(app_url)
            page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk, mid-job")
            page.get_by_role("button", name="Generate", exact=True).click()
            status = page.locator(".easel-status[data-status=running]")
            expect(status).to_contain_text("ETA")
            expect(status).to_contain_text(f"/{STEPS}")
            expect(page.locator(".easel-status [role=progressbar]:not([aria-valuenow='0'])")).to_have_count(1)
            page.evaluate("window.scrollTo(0, 0)")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "gradio-mid-job.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            task_id = page.get_by_label("Job", exact=True).input_value()
            assert recent(easel, task_id)["status"] == "running"
            page.get_by_role("button", name="Cancel", exact=True).click()
            expect(page.locator(".easel-status[data-status=cancelled]")).to_have_count(1)
            assert recent(easel, task_id)["status"] == "cancelled"
        finally:
            browser.close()
    with Image.open(shot) as img:
        stat = ImageStat.Stat(img.convert("L"))
        assert img.size == (1280, 900) and stat.stddev[0] > 5, "the screenshot is blank"
        assert len(img.convert("RGB").getcolors(1 << 24) or []) > 50, "the screenshot has almost no colours"
