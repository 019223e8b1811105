"""The worker's model host (server/worker/host.py), end to end on real servers with
the stub: one pipeline call per model at a time, a lost model process started again,
residency budgets from what a model holds after a job, and img2img counted by the
steps it runs."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from PIL import Image

from .servers import RunningServer, model_processes, stub_settings
from .test_api import wait_done, wait_running


def init_image() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 90, 200)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def submit(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/api/generate", json={"prompt": "a lighthouse", "width": 64, "height": 64, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def model_info(c: httpx.Client, name: str) -> dict[str, Any]:
    return next(m for m in c.get("/v1/admin/models").json()["models"] if m["name"] == name)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- img2img steps


def test_img2img_progress_and_forecast_count_the_steps_that_run(server_factory: Callable[..., RunningServer]) -> None:
    """20 steps at strength 0.35 run 7 denoising steps: the job's total is 7, its
    last step reads 7 of 7, and its forecast is that of a 7-step job, not 20."""
    settings = stub_settings(simulate_step_seconds=12.0)  # 0.05 s a step at 64x64
    settings["models"]["slow"] = {**settings["models"]["stub"], "simulate_step_seconds": 120.0}  # 0.5 s a step
    srv = server_factory(settings)
    c = srv.client

    job = submit(c, init_image=init_image(), steps=20, strength=0.35, seed=3)
    seen: list[tuple[int, int]] = []
    with c.stream("GET", "/api/events", params={"task_id": job["task_id"]}) as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                st = json.loads(line[6:])
                seen.append((st["step"], st["total_steps"]))
                if st["status"] in ("done", "error", "cancelled"):
                    break
    assert st["status"] == "done", st
    assert {total for _, total in seen} == {7}, seen
    assert max(step for step, _ in seen) == 7, seen

    # forecasts, read from the differences between jobs queued behind a job that holds the model
    hold = submit(c, model="slow", prompt="hang 30", steps=2)["task_id"]
    wait_running(c, hold)
    expected = [submit(c, model="slow", **body)["expected_time_seconds"] for body in (
        {"steps": 7}, {"steps": 7, "seed": 2}, {"steps": 20, "strength": 0.35, "init_image": init_image()}, {"steps": 20})]  # fmt: skip
    seven, img2img, twenty = (b - a for a, b in zip(expected, expected[1:], strict=False))
    assert abs(img2img - seven) <= 0.05 * seven, expected
    assert twenty > 2 * img2img, expected
    c.post("/api/clear")
    c.get("/api/cancel", params={"task_id": hold})


def test_img2img_with_no_step_left_is_a_400_naming_strength(server_factory: Callable[..., RunningServer]) -> None:
    c = server_factory().client
    r = c.post("/api/generate", json={"prompt": "x", "init_image": init_image(), "steps": 2, "strength": 0.2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "strength", r.text
    assert "at least 5 steps" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- one call at a time


def test_jobs_on_a_model_with_target_inflight_2_never_exchange_steps_or_images(server_factory: Callable[..., RunningServer]) -> None:
    """The model's own process serves one call at a time: 8 jobs submitted at once each
    end done with their own image (the same pixels as that job run alone) and their own
    steps."""
    srv = server_factory(stub_settings(isolate=True, target_inflight=2, simulate_step_seconds=12.0))
    c = srv.client

    def one(seed: int) -> tuple[dict[str, Any], bytes]:
        with httpx.Client(base_url=srv.url, timeout=60) as own:
            st = wait_done(own, submit(own, prompt=f"job {seed}", steps=3, seed=seed)["task_id"], timeout=60)
            return st, own.get("/api/image", params={"task_id": st["task_id"]}).content

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    for seed, (st, png) in enumerate(together):
        assert st["status"] == "done" and st["step"] == st["total_steps"] == 3, st
        assert st["images"][0]["seed"] == seed and st["images"][0]["prompt"] == f"job {seed}", st
        alone_st, alone = one(seed)
        assert pixels(png) == pixels(alone), seed
    assert model_info(c, "stub")["state"] == "loaded"


def pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


# ----------------------------------------------------------------------------- lost processes


def test_a_device_fault_ends_the_model_process_and_the_next_job_runs(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory(stub_settings(isolate=True))
    c = srv.client
    before = model_processes(srv.proc.pid)
    assert len(before) == 1, before
    failed = wait_done(c, submit(c, prompt="device fault", steps=2)["task_id"])
    assert failed["status"] == "error" and "device failed" in failed["message"] and "started again" in failed["message"], failed
    after = wait_done(c, submit(c, prompt="a lighthouse", steps=2)["task_id"], timeout=60)
    assert after["status"] == "done", after
    now = model_processes(srv.proc.pid)
    assert len(now) == 1 and now != before, (before, now)  # a new process serves the model
    assert model_info(c, "stub")["state"] == "loaded"


def test_a_model_process_killed_mid_job_is_started_again(server_factory: Callable[..., RunningServer]) -> None:
    """Killed (as the kernel's OOM killer would): the job ends as error, the model does
    not read 'loaded' with no process behind it, and the next job runs."""
    import os
    import signal

    srv = server_factory(stub_settings(isolate=True))
    c = srv.client
    tid = submit(c, prompt="hang 20", steps=2)["task_id"]
    wait_running(c, tid)
    (child,) = model_processes(srv.proc.pid)
    os.kill(child, signal.SIGKILL)
    failed = wait_done(c, tid)
    assert failed["status"] == "error" and "exited unexpectedly" in failed["message"], failed
    assert wait_done(c, submit(c, steps=2)["task_id"], timeout=60)["status"] == "done"


def test_a_device_fault_in_the_servers_process_marks_the_model_error(server_factory: Callable[..., RunningServer]) -> None:
    """In-process (``isolate: false``) a broken CUDA context cannot be replaced: the
    model stops taking jobs and says why, instead of failing every job that follows."""
    srv = server_factory(stub_settings())
    c = srv.client
    failed = wait_done(c, submit(c, prompt="device fault", steps=2)["task_id"])
    assert failed["status"] == "error", failed
    deadline = time.monotonic() + 10
    while (info := model_info(c, "stub"))["state"] != "error" and time.monotonic() < deadline:
        time.sleep(0.05)  # the state is set as the job ends: no event to await
    assert info["state"] == "error" and "restart the server" in info["load_error"], info


# ----------------------------------------------------------------------------- residency


def test_the_budget_counts_a_models_peak_after_its_first_job(server_factory: Callable[..., RunningServer]) -> None:
    """Two models of 400 MiB fit a 1000 MiB budget by their weights; once ``a`` has run
    a job it holds 700 MiB at its peak, so loading ``b`` unloads it (idle)."""
    settings = stub_settings(simulate_size_mib=400, simulate_peak_mib=300)
    settings["models"]["b"] = {**settings["models"]["stub"], "enabled": False, "simulate_peak_mib": 0}
    settings["residency"] = {"memory_budget_mib": {"cpu": 1000}}
    c = server_factory(settings).client
    assert model_info(c, "stub")["size_mib"] == 400
    assert wait_done(c, submit(c, steps=2)["task_id"])["status"] == "done"
    assert model_info(c, "stub")["size_mib"] == 700  # measured after the job
    r = c.post("/v1/admin/models/b/load")
    assert r.status_code == 200 and r.json()["state"] == "loaded", r.text
    assert model_info(c, "stub")["state"] == "unloaded"  # 700 + 400 > 1000: the idle one made room


def test_without_a_peak_both_models_stay(server_factory: Callable[..., RunningServer]) -> None:
    """The same two models, the first holding nothing beyond its weights: both stay."""
    settings = stub_settings(simulate_size_mib=400)
    settings["models"]["b"] = {**settings["models"]["stub"], "enabled": False}
    settings["residency"] = {"memory_budget_mib": {"cpu": 1000}}
    c = server_factory(settings).client
    assert wait_done(c, submit(c, steps=2)["task_id"])["status"] == "done"
    assert c.post("/v1/admin/models/b/load").json()["state"] == "loaded"
    assert model_info(c, "stub")["state"] == "loaded"


# ----------------------------------------------------------------------------- families


def test_a_new_family_is_one_record_and_its_module(monkeypatch: Any, tmp_path: Any) -> None:
    """A family easel did not know: its module (here the stub's own) and one ``Family``
    record.  Config, capabilities, defaults and the worker all follow the record."""
    import asyncio
    import dataclasses

    from server import families
    from server.app import create_app
    from server.config import build_settings

    sketch = dataclasses.replace(families.FAMILIES["stub"], key="sketch", tasks=("generate",), inpaint=False, steps=3)
    monkeypatch.setitem(families.FAMILIES, "sketch", sketch)
    monkeypatch.chdir(tmp_path)
    settings = build_settings({"models": {"pencil": {"backend": "sketch", "enabled": True, "default_width": 64, "default_height": 64}}})

    async def run() -> tuple[dict[str, Any], dict[str, Any], int]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://easel") as c:
                model = next(m for m in (await c.get("/api/ps")).json()["models"] if m["name"] == "pencil")
                tid = (await c.post("/api/generate", json={"prompt": "a pencil sketch"})).json()["task_id"]
                while (st := (await c.get("/api/status", params={"task_id": tid, "wait": 10})).json())["status"] not in (
                    "done", "error"):  # fmt: skip
                    pass
                edit = (await c.post("/api/edit", json={"prompt": "x", "images": [init_image()]})).status_code
                return model, st, edit

    model, st, edit = asyncio.run(run())
    assert st["status"] == "done" and st["total_steps"] == 3, st  # the family's default steps
    assert edit == 400  # its tasks: generate only
    assert model["state"] == "loaded", model


def test_an_unknown_family_is_a_config_error_naming_the_known_ones() -> None:
    import pytest

    from server.config import ConfigError, build_settings
    from server.families import FAMILIES

    with pytest.raises(ConfigError, match=r"backend 'dalle' is not one easel serves \(one of: " + ", ".join(FAMILIES)):
        build_settings({"models": {"x": {"backend": "dalle"}}})
