"""Seed 003's (mflux-server's) own clients, unchanged, against easel: its standalone
web page opened from ``file://`` in headless Chromium (every call cross-origin, so it
needs ``http.cors_origins``), and its Gradio app under gradio 5 in a virtual environment
of its own (made here once, under ~/.cache/easel-tests), driven by ``gradio_client``.
The files stay in ``../shared/seeds/003-clients/``; nothing is copied into the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from .servers import ROOT, RunningServer, free_port, stub_settings

SEED = ROOT.parent / "shared" / "seeds" / "003-clients"
if not SEED.is_dir():
    pytest.skip(f"seed 003's clients are not at {SEED} (the shared/ folder beside the checkout)", allow_module_level=True)
VENV = Path(os.environ.get("EASEL_GRADIO5_VENV", Path.home() / ".cache" / "easel-tests" / "gradio5-venv"))
GRADIO5 = ["gradio>=5.5,<6", "requests"]
PIP_TIMEOUT = 900  # the first run downloads gradio 5; later runs reuse the venv


@pytest.fixture(scope="module")
def easel(server_factory: Callable[..., RunningServer]) -> RunningServer:
    settings = stub_settings(simulate_step_seconds=0.2, default_width=512, default_height=512)
    settings["http"] = {"cors_origins": ["null"]}  # a page opened from file:// sends Origin: null
    return server_factory(settings)


def test_seed_web_page_from_file_generates_an_image(easel: RunningServer) -> None:
    from .web_fixtures import ARGS, CHROMIUM, expect, sync_api  # skips without Chromium/Playwright

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            failed: list[str] = []
            page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}") if r.url.startswith(easel.url) else None)
            page.goto((SEED / "index.html").as_uri())
            page.locator("#mflux-server").fill(easel.url)  # its own endpoint field
            page.locator("#prompt").fill("a red fox, from seed 003's page")
            page.locator("#generate-button").click()
            image = page.locator("#image-container img")
            expect(image).to_have_count(1)
            expect(image).to_have_js_property("complete", True)
            assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [512, 512]
            expect(page.locator("#status")).to_have_value("All images generated.")
            assert failed == [], failed
        finally:
            browser.close()
    recent = easel.client.get("/api/tasks").json()["recent"]
    assert any(t["status"] == "done" and t["images"][0]["prompt"] == "a red fox, from seed 003's page" for t in recent), recent


def gradio5_python() -> Path:
    """The venv's interpreter with gradio 5, made (once) when missing; skips when pip cannot."""
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import gradio, requests; assert gradio.__version__.startswith('5.')"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=120).returncode == 0:
        return python
    staging = VENV.with_name(f"{VENV.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, capture_output=True, timeout=120)
        pip = subprocess.run(
            [str(staging / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *GRADIO5],
            capture_output=True, text=True, timeout=PIP_TIMEOUT,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.skip(f"could not make the gradio 5 venv at {VENV}: {exc}")
    if pip.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.skip(f"pip could not install {' '.join(GRADIO5)} into a venv: {pip.stderr[-600:]}")
    shutil.rmtree(VENV, ignore_errors=True)
    staging.rename(VENV)  # only a complete venv takes the name (always run as `python -m`)
    return python


@pytest.mark.timeout(PIP_TIMEOUT + 300)
def test_seed_gradio_app_under_gradio_5_generates_an_image(easel: RunningServer, tmp_path: Path) -> None:
    gradio_client = pytest.importorskip("gradio_client", reason="needs requirements-gradio.txt (gradio_client)")
    from .test_gradio import start_app, stop

    python = gradio5_python()
    port = free_port()  # the app reads GRADIO_SERVER_PORT (gradio's own setting); it has no port flag
    env = {"GRADIO_SERVER_PORT": str(port), "PYTHONPATH": ""}
    proc = start_app(tmp_path, [str(python), str(SEED / "mflux-gradio-ui.py"), "--server", easel.url], port, env)
    try:
        client: Any = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
        image, status = client.predict("a red fox", 256, 256, 4, "7", "PNG", 85, False, api_name="/predict")
        assert status == "Image generation completed."
        with Image.open(image) as img:
            assert img.size == (256, 256)
    finally:
        stop(proc)
