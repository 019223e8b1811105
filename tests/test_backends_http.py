"""The Diffusers backends through the running server's HTTP API: load/unload over
the admin endpoints, generate, edit, LoRA and cancel over the job API, memory after
unloading (in process and isolated), and forecasts that learn per backend.

One server (``tests/tiny_server.py``: one torch thread, small Qwen reference resize)
serves every test; each test loads the models it uses and unloads them again.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from tests.backend_helpers import reference, write_alternative_z_image
from tests.servers import ROOT, model_processes, stub_settings
from tests.test_api import wait_done

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import httpx
    from PIL.Image import Image

    from tests.servers import RunningServer

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = pytest.mark.timeout(240)

SMALL = {"width": 64, "height": 64, "steps": 2}
LORA = ("sdxl", "flux2_klein", "z_image")
REFERENCES = {"sdxl": 1, "z_image": 1, "flux2_klein": 2, "qwen_edit_gguf": 1}  # edit references per backend


@pytest.fixture(scope="module")
def srv(
    server_factory: Callable[..., RunningServer],
    tiny_model_dirs: dict[str, Path],
    qwen_gguf: Path,
    lora_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> RunningServer:
    tmp = tmp_path_factory.mktemp("http_models")
    common = {"max_images": 8, "default_width": 64, "default_height": 64, "recommended_steps": 2}
    models: dict[str, dict[str, Any]] = {
        name: {"backend": name, "model_path": str(path), **common} for name, path in tiny_model_dirs.items()
    }
    for name in LORA:
        models[name]["lora_dir"] = str(lora_dirs[name])
    models["qwen_edit_gguf"].update(
        model_path=None, transformer_path=str(qwen_gguf), base_model_path=str(tiny_model_dirs["qwen_edit_gguf"])
    )
    models["alternative"] = {"backend": "z_image", "model_path": str(write_alternative_z_image(tmp / "alt")), **common}
    models["missing"] = {"backend": "sdxl", "model_path": str(tmp / "not-downloaded"), **common}
    models["fp16_only"] = {"backend": "sdxl", "model_path": str(fp16_files_only(tiny_model_dirs["sdxl"], tmp / "fp16")), **common}
    models["isolated"] = {**models["sdxl"], "isolate": True}  # as every Diffusers model is by default
    models["in_process"] = {**models["sdxl"], "isolate": False}
    # refs cost nothing in the prior: a forecast that grows with them has learned it
    models["forecast"] = {**models["flux2_klein"], "forecast_prior": {"job": 0.05, "step_mp": 1.0}}
    settings = stub_settings()
    settings["models"].update(models)
    return server_factory(settings, env={"OMP_NUM_THREADS": "1"}, script=ROOT / "tests" / "tiny_server.py")


# ------------------------------------------------------------------ helpers


def fp16_files_only(src: Path, dst: Path) -> Path:
    """``src`` with every weight file named as the fp16 variant only, as
    ``hf download --include "*.fp16.*"`` leaves a repository that ships both."""
    shutil.copytree(src, dst)
    for f in list(dst.glob("*/*")):
        if f.suffix in (".safetensors", ".bin"):
            f.rename(f.with_name(f"{f.stem}.fp16{f.suffix}"))
    return dst


def model_state(c: httpx.Client, name: str) -> dict[str, Any]:
    models = c.get("/v1/admin/models").json()["models"]
    return next(m for m in models if m["name"] == name)  # type: ignore[no-any-return]


def load(c: httpx.Client, name: str, timeout: float = 60) -> list[str]:
    """Load with ``?wait=false`` and poll /v1/admin/models (the only way to follow a
    load) until it settles; returns the states seen, the load response's first."""
    r = c.post(f"/v1/admin/models/{name}/load", params={"wait": "false"})
    assert r.status_code == 200, r.text
    seen = [r.json()["state"]]
    deadline = time.monotonic() + timeout
    while seen[-1] == "loading" and time.monotonic() < deadline:
        seen.append(model_state(c, name)["state"])
        time.sleep(0.02)  # nothing to await: a load has no event stream
    return seen


def unload(c: httpx.Client, name: str) -> None:
    r = c.post(f"/v1/admin/models/{name}/unload")
    assert r.status_code == 200 and r.json()["state"] == "unloaded", r.text
    assert name not in [m["id"] for m in c.get("/v1/models").json()["data"]]


def data_url(image: Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def submit(c: httpx.Client, model: str, task: str = "generate", refs: int = 0, ref_size: int = 64, **body: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": "a red fox", "seed": 1, **SMALL, **body}
    if refs:
        body["images"] = [data_url(reference(ref_size, ref_size, seed=k)) for k in range(refs)]
    r = c.post(f"/api/{task}", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def run(c: httpx.Client, model: str, task: str = "generate", refs: int = 0, **body: Any) -> bytes:
    """Submit, wait, and fetch the image bytes."""
    st = wait_done(c, submit(c, model, task, refs, **body)["task_id"], timeout=120)
    assert st["status"] == "done", st
    r = c.get("/api/image", params={"task_id": st["task_id"]})
    assert r.status_code == 200
    return r.content


def pixels(png: bytes) -> bytes:
    """The decoded pixels: the files also carry their parameters (model name, LoRAs)."""
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(png)) as img:
        return img.tobytes()


def rss_mib(c: httpx.Client) -> float:
    return float(c.get("/v1/admin/gpu-memory").json()["devices"][0]["process_rss_mib"])


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("backend", ["sdxl", "flux2_klein", "z_image", "qwen_edit_gguf"])
def test_backend_lifecycle_over_http(srv: RunningServer, backend: str) -> None:
    c = srv.client
    states = load(c, backend)
    assert states[0] == "loading" and states[-1] == "loaded" and set(states) <= {"loading", "loaded"}, states
    assert backend in [m["id"] for m in c.get("/v1/models").json()["data"]]

    task, refs = ("edit", 1) if backend == "qwen_edit_gguf" else ("generate", 0)
    if task == "edit":  # edit only: text-to-image is refused up front
        assert c.post("/api/generate", json={"model": backend, "prompt": "x", **SMALL}).status_code == 400
    base = pixels(run(c, backend, task, refs))
    assert pixels(run(c, backend, task, refs)) == base  # same seed -> identical pixels
    assert pixels(run(c, backend, task, refs, seed=2)) != base
    if backend in LORA:
        assert pixels(run(c, backend, loras=[{"name": "style"}])) != base
        assert pixels(run(c, backend, loras=[{"name": "style", "scale": 0.0}])) == base
    if task != "edit":
        edited = pixels(run(c, backend, "edit", REFERENCES[backend], steps=4))  # img2img needs steps * strength >= 1
        assert edited != base
    unload(c, backend)


def test_a_folder_not_written_by_the_builders_loads_and_generates(srv: RunningServer) -> None:
    c = srv.client
    assert load(srv.client, "alternative")[-1] == "loaded"
    image = run(c, "alternative", width=64, height=48)
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    unload(c, "alternative")


def test_a_folder_with_only_fp16_weight_files_loads_as_that_variant(srv: RunningServer) -> None:
    c = srv.client
    assert load(c, "fp16_only")[-1] == "loaded", model_state(c, "fp16_only")
    load(c, "sdxl")
    # the same weights under other file names: the same pixels
    assert pixels(run(c, "fp16_only", seed=3)) == pixels(run(c, "sdxl", seed=3))
    unload(c, "fp16_only")
    unload(c, "sdxl")


def test_missing_model_path_is_a_readable_load_error_and_the_server_keeps_serving(srv: RunningServer) -> None:
    c = srv.client
    r = c.post("/v1/admin/models/missing/load")
    assert r.status_code == 500 and r.json()["state"] == "error"
    info = model_state(c, "missing")
    assert info["state"] == "error" and "does not exist" in info["load_error"] and "Traceback" not in info["load_error"]
    r = c.post("/api/generate", json={"model": "missing", "prompt": "x"})
    assert r.status_code == 409 and "does not exist" in r.json()["error"]["message"]
    assert run(c, "stub")[:4] == b"\x89PNG"


def test_cancel_over_http_stops_a_running_job_within_a_step(srv: RunningServer) -> None:
    c = srv.client
    load(c, "sdxl")
    tid = submit(c, "sdxl", width=256, height=256, steps=50)["task_id"]
    seen = None
    with c.stream("GET", "/api/events", params={"task_id": tid}) as events:
        for line in events.iter_lines():
            if line.startswith("data: ") and (st := json.loads(line[6:])).get("step", 0) >= 1:
                seen = st["step"]
                cancelled = c.get("/api/cancel", params={"task_id": tid}).json()
                break
    assert seen is not None and cancelled["status"] == "cancelled"
    final = wait_done(c, tid)
    assert final["status"] == "cancelled" and final["step"] <= seen + 1, (seen, final)
    assert run(c, "sdxl")[:4] == b"\x89PNG"  # the worker goes on
    unload(c, "sdxl")


def test_partial_images_cross_from_the_model_process_to_an_openai_stream(srv: RunningServer) -> None:
    """The model's process is asked for previews a step ahead: the official SDK's
    stream still gets exactly the partial images it asked for, then the image."""
    from openai import OpenAI

    c = srv.client
    load(c, "isolated", timeout=120)
    with OpenAI(base_url=srv.url + "/v1", api_key="x") as sdk:
        events = list(sdk.images.generate(model="isolated", prompt="a red fox", size="64x64", stream=True,
                                          partial_images=2, extra_body={"steps": 6}))  # fmt: skip
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    unload(c, "isolated")


def test_unloading_returns_memory_in_process(srv: RunningServer) -> None:
    c = srv.client
    after_unload = []
    for _ in range(3):
        load(c, "in_process")
        run(c, "in_process", width=128, height=128)
        unload(c, "in_process")
        after_unload.append(rss_mib(c))
    print(f"server RSS after each unload (MiB): {after_unload}")
    assert abs(after_unload[2] - after_unload[0]) <= 0.1 * after_unload[0], after_unload


def test_an_isolated_model_lives_and_dies_with_its_own_process(srv: RunningServer) -> None:
    c = srv.client
    before = model_processes(srv.proc.pid)
    after_unload = []
    for cycle in range(3):
        states = load(c, "isolated", timeout=120)
        assert states[-1] == "loaded", model_state(c, "isolated")
        assert cycle > 0 or "loading" in states[1:]  # a child process takes seconds to start
        (child,) = model_processes(srv.proc.pid) - before
        run(c, "isolated", width=128, height=128)
        unload(c, "isolated")
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        after_unload.append(rss_mib(c))
    print(f"server RSS after each isolated unload (MiB): {after_unload}")
    assert abs(after_unload[2] - after_unload[0]) <= 0.1 * after_unload[0], after_unload


def test_forecast_learns_the_cost_of_reference_images(srv: RunningServer) -> None:
    c = srv.client
    load(c, "forecast")
    forecast = {}
    for _ in range(3):
        for refs in (1, 8):
            sub = submit(c, "forecast", "edit", refs, ref_size=128)
            forecast[refs] = sub["expected_time_seconds"]  # the queue is idle: just this job
            assert wait_done(c, sub["task_id"], timeout=120)["status"] == "done"
    learned = next(m for m in c.get("/api/ps").json()["models"] if m["name"] == "forecast")["forecast"]["image"]
    assert learned["samples"] == 6
    assert learned["seconds"] != learned["prior_seconds"]
    assert forecast[8] > forecast[1], (forecast, learned)
    unload(c, "forecast")


@pytest.mark.parametrize("backend", ["sdxl", "flux2_klein", "z_image", "qwen_edit_gguf"])
def test_masked_edit_and_outpaint_over_http_change_only_the_mask(srv: RunningServer, backend: str) -> None:
    """The family's inpaint pipeline, composited over the input: outside the mask (and
    outside the feather band inside its edge) every pixel is the input's."""
    import numpy as np
    from PIL import Image

    from server.masking import feather

    def edit(**body: Any) -> Image.Image:
        st = wait_done(c, submit(c, backend, "edit", **body)["task_id"], timeout=120)
        assert st["status"] == "done", st["message"]
        return Image.open(io.BytesIO(c.get("/api/image", params={"task_id": st["task_id"]}).content))

    c = srv.client
    load(c, backend)
    src = reference(64, 64, seed=5)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = edit(images=[data_url(src)], mask=data_url(mask), mask_blur=4)
    alpha = np.asarray(feather(mask, 4))
    diff = np.abs(np.asarray(out.convert("RGB"), np.int16) - np.asarray(src, np.int16)).max(axis=2)
    assert out.size == (64, 64) and diff[alpha == 0].max() == 0 and diff[alpha == 255].mean() > 8, diff[alpha == 255].mean()

    out = edit(images=[data_url(src)], expand={"right": 16, "bottom": 16})
    grown = np.asarray(out.convert("RGB"), np.int16)
    assert out.size == (80, 80)
    assert (grown[:64, :64] == np.asarray(src, np.int16)).all()  # the original area, unchanged
    assert grown[64:, :].std() > 1 and grown[:, 64:].std() > 1  # the new area is filled
    unload(c, backend)
