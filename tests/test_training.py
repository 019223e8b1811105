"""LoRA training through HTTP on tiny FLUX.2-klein and Z-Image pipelines."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from .datasets import write_dataset
from .servers import RunningServer
from .test_api import wait_done
from .tiny_pipelines import build_flux2_klein, build_z_image


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("training")
    root = tmp / "datasets"
    write_dataset(root / "shapes")
    write_dataset(root / "nocaption", 2)
    (root / "nocaption" / "square.txt").unlink()
    write_dataset(root / "broken", 2)
    (root / "broken" / "square.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_dataset(tmp / "outside" / "shapes")
    (root / "link").symlink_to(tmp / "outside" / "shapes")
    return {
        "tmp": tmp,
        "root": root,
        "flux": build_flux2_klein(tmp / "flux"),
        "zimg": build_z_image(tmp / "zimg"),
    }


@pytest.fixture(scope="module")
def srv(server_factory: Callable[..., RunningServer], env: dict[str, Path]) -> RunningServer:
    def model(backend: str, path: Path, lora_dir: Path | None) -> dict[str, Any]:
        cfg: dict[str, Any] = {"backend": backend, "enabled": True, "model_path": str(path), "device": "cpu",
                               "default_width": 64, "default_height": 64, "recommended_steps": 2}  # fmt: skip
        if lora_dir is not None:
            cfg["lora_dir"] = str(lora_dir)
        return cfg

    tmp = env["tmp"]
    settings = {
        "models": {
            "flux": model("flux2_klein", env["flux"], tmp / "loras-flux"),
            "zimg": model("z_image", env["zimg"], tmp / "loras-zimg"),
            "nolora": model("z_image", env["zimg"], None),
            "stub": {"backend": "stub", "enabled": True},
        },
        "default_model": "zimg",
        "training": {"dataset_roots": [str(env["root"])]},
    }
    return server_factory(settings)


def generate(c: httpx.Client, model: str, loras: list[dict[str, Any]] | None = None) -> np.ndarray:
    body: dict[str, Any] = {"model": model, "prompt": "a circle in the easel style", "seed": 11, "steps": 2}
    if loras is not None:
        body["loras"] = loras
    r = c.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    st = wait_done(c, r.json()["task_id"], timeout=60)
    assert st["status"] == "done", st
    data = c.get("/api/image", params={"task_id": st["task_id"]}).content
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)


def train(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/api/train", json={"dataset_dir": "shapes", "rank": 4, "learning_rate": 0.05, "resolution": 32, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def wait_for_step(c: httpx.Client, task_id: str, step: int) -> dict[str, Any]:
    """Follow the job's event stream until it reports ``step`` training steps."""
    with c.stream("GET", "/api/events", params={"task_id": task_id}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                st = json.loads(line[6:])
                if st.get("step", 0) >= step or st.get("status") in ("done", "error", "cancelled"):
                    return st  # type: ignore[no-any-return]
    raise AssertionError(f"job {task_id} ended its stream before step {step}")


def metadata(c: httpx.Client, model: str, name: str) -> dict[str, Any]:
    found = {a["name"]: a for a in c.get("/api/loras", params={"model": model}).json()["loras"]}
    assert name in found, found
    assert Path(found[name]["path"]).is_file()
    return found[name]["metadata"]  # type: ignore[no-any-return]


# --- training and using the adapter ---------------------------------------------------


@pytest.mark.parametrize("model", ["flux", "zimg"])
def test_trained_adapter_is_saved_with_metadata_and_changes_generations(srv: RunningServer, model: str) -> None:
    c = srv.client
    base = generate(c, model)
    sub = train(c, model=model, adapter_name="shapes", steps=4, batch_size=2, seed=3)
    assert sub["expected_time_seconds"] > 0 and sub["seed"] == 3
    st = wait_done(c, sub["task_id"], timeout=120)
    assert st["status"] == "done", st
    assert st["task"] == "train" and st["step"] == 4 and isinstance(st["extra"]["loss"], float)

    meta = metadata(c, model, "shapes")
    assert meta["steps_done"] == 4 and meta["complete"] and meta["rank"] == 4 and meta["alpha"] == 4
    assert meta["images"] == 4 and meta["dataset"].endswith("shapes") and meta["final_loss"] > 0

    assert not np.array_equal(generate(c, model, [{"name": "shapes"}]), base)
    assert np.array_equal(generate(c, model, [{"name": "shapes", "scale": 0}]), base)
    assert np.array_equal(generate(c, model), base)  # the live model serves base weights again


def test_existing_adapter_is_not_overwritten_by_accident(srv: RunningServer) -> None:
    c = srv.client
    wait_done(c, train(c, model="zimg", adapter_name="twice", steps=1)["task_id"], timeout=60)
    r = c.post("/api/train", json={"model": "zimg", "dataset_dir": "shapes", "adapter_name": "twice", "steps": 1})
    assert r.status_code == 409 and "overwrite" in r.json()["error"]["message"]


# --- stopping ---------------------------------------------------------------------------


def test_stop_ends_the_run_gracefully_and_keeps_a_loadable_checkpoint(srv: RunningServer) -> None:
    c = srv.client
    base = generate(c, "zimg")
    r = c.post("/v1/training/z-image-lora", json={
        "dataset_dir": "shapes", "output_dir": "stopped", "max_train_steps": 100_000, "rank": 4,
        "learning_rate": 0.05, "resolution": 32, "checkpointing_steps": 100_000,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["adapter_name"] == "stopped" and run["total_steps"] == 100_000
    wait_for_step(c, run["task_id"], 1)
    listed = c.get("/v1/training/z-image-lora").json()
    assert listed["active"]["task_id"] == run["task_id"] and listed["active"]["loss"] is not None

    stopped = c.post("/v1/training/z-image-lora/stop").json()
    final = next(x for x in stopped["runs"] if x["task_id"] == run["task_id"])
    assert final["status"] == "cancelled" and stopped["active"] is None
    match = re.fullmatch(r"stopped at step (\d+); checkpoint saved", final["message"])
    assert match, final["message"]
    steps_done = int(match.group(1))
    assert steps_done >= 1 and final["step"] == steps_done and final["checkpoint_step"] == steps_done

    meta = metadata(c, "zimg", "stopped")
    assert meta["steps_done"] == steps_done and not meta["complete"]
    assert not np.array_equal(generate(c, "zimg", [{"name": "stopped"}]), base)


def test_generate_behind_a_training_run_waits_for_its_remaining_time(srv: RunningServer) -> None:
    c = srv.client
    sub = train(c, model="zimg", adapter_name="long", steps=100_000)
    wait_for_step(c, sub["task_id"], 3)  # the forecast now uses the run's measured step rate
    gen = c.post("/api/generate", json={"model": "zimg", "prompt": "behind", "steps": 2}).json()
    gen_st = c.get("/api/status", params={"task_id": gen["task_id"]}).json()
    train_st = c.get("/api/status", params={"task_id": sub["task_id"]}).json()
    assert gen_st["pos"] == 1 and gen_st["status"] == "waiting"
    assert train_st["wait_remaining"] > 10  # 100k steps left at a measured rate
    assert gen_st["wait_remaining"] >= train_st["wait_remaining"]
    # at its submission, a moment earlier: the training's remainder (100k steps at a rate
    # measured over the last few) moves by several percent from one step to the next
    assert gen["expected_time_seconds"] >= 0.8 * train_st["wait_remaining"]
    cancelled = c.get("/api/cancel", params={"task_id": sub["task_id"]}).json()
    assert cancelled["status"] == "cancelled"
    assert wait_done(c, gen["task_id"], timeout=60)["status"] == "done"


# --- refusals before queueing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "status", "needle"),
    [
        ("nocaption", 400, "square.png"),
        ("broken", 400, "square.png"),
        ("missing", 400, "not a folder"),
    ],
)
def test_bad_dataset_is_refused_naming_the_file(srv: RunningServer, dataset: str, status: int, needle: str) -> None:
    r = srv.client.post("/api/train", json={"model": "zimg", "dataset_dir": dataset, "adapter_name": "bad"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["param"] == "dataset_dir"


def test_dataset_outside_the_roots_is_refused(srv: RunningServer, env: dict[str, Path]) -> None:
    outside = env["tmp"] / "outside" / "shapes"
    escapes = [str(outside), "../outside/shapes", str(env["root"] / "shapes" / ".." / ".." / "outside" / "shapes"), "link"]
    for path in escapes:
        r = srv.client.post("/api/train", json={"model": "zimg", "dataset_dir": path, "adapter_name": "escape"})
        assert r.status_code == 403, (path, r.text)
        assert "outside training.dataset_roots" in r.json()["error"]["message"]


@pytest.mark.parametrize(("model", "needle"), [("nolora", "no lora_dir"), ("stub", "cannot train")])
def test_model_that_cannot_train_is_refused(srv: RunningServer, model: str, needle: str) -> None:
    r = srv.client.post("/api/train", json={"model": model, "dataset_dir": "shapes", "adapter_name": "x"})
    assert r.status_code == 400 and needle in r.json()["error"]["message"]


# --- failures -------------------------------------------------------------------------


def test_error_mid_run_keeps_earlier_checkpoints_and_removes_the_adapter(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner in-process on a loaded tiny Z-Image backend; step 4 fails."""
    from server.backends import create_backend
    from server.backends.base import BackendError
    from server.config import build_settings
    from server.training.dataset import validate_dataset
    from server.training.families import ZImageFamily
    from server.training.lora_trainer import ADAPTER, LoraTrainer
    from server.training.plan import TrainPlan

    settings = build_settings({"models": {"z": {"backend": "z_image", "model_path": str(env["zimg"]), "device": "cpu"}}})
    backend: Any = create_backend("z", settings.models["z"], settings)  # in this process: patched below
    backend.load()
    folder, samples = validate_dataset("shapes", [str(env["root"])])
    calls = {"n": 0}
    predict = ZImageFamily.predict

    def failing_predict(self: ZImageFamily, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated failure")
        return predict(self, *args)

    monkeypatch.setattr(ZImageFamily, "predict", failing_predict)
    plan = TrainPlan(
        model="z", backend="z_image", base_model=None, dataset=str(folder), samples=samples, adapter_name="fails",
        output=str(tmp_path / "fails"), steps=10, rank=4, alpha=4.0, learning_rate=0.01, batch_size=1, resolution=32,
        seed=0, save_every=2, gradient_checkpointing=False,
    )  # fmt: skip

    class Ctx:
        job_id = "t"
        cancelled = False

        def step(self, i: int, total: int) -> None:
            pass

        def set_extra(self, **values: Any) -> None:
            pass

    with pytest.raises(BackendError, match=r"failed at step 4: .*simulated failure.*checkpoint of step 2 is kept"):
        LoraTrainer(plan).run(backend, Ctx())  # type: ignore[arg-type]
    assert json.loads((tmp_path / "fails" / "easel_lora.json").read_text())["steps_done"] == 2
    assert ADAPTER not in getattr(backend.pipe.transformer, "peft_config", {})
    assert not backend.pipe.transformer.training


# --- the Python clients' train() ---------------------------------------------------------


def test_client_train_runs_to_done_and_reports_loss(srv: RunningServer) -> None:
    from clients import Client

    steps: list[int] = []
    with Client(srv.url) as client:
        final = client.train(
            "zimg",
            "shapes",
            "client-sync",
            steps=3,
            rank=4,
            resolution=32,
            overwrite=True,
            on_progress=lambda st: steps.append(st["step"]),
            timeout=120,
        )
    assert final["status"] == "done" and final["step"] == 3
    assert "loss" in final["extra"] and steps[-1] == 3
    assert metadata(srv.client, "zimg", "client-sync")["steps"] == 3


@pytest.mark.anyio
async def test_async_client_train_runs_to_done(srv: RunningServer) -> None:
    from clients import AsyncClient

    async with AsyncClient(srv.url) as client:
        final = await client.train("zimg", "shapes", "client-async", steps=2, rank=4, resolution=32, overwrite=True, timeout=120)
    assert final["status"] == "done" and final["step"] == 2


def test_models_that_can_train_say_so_in_their_capabilities(srv: RunningServer) -> None:
    tasks = {m["id"]: m["capabilities"]["tasks"] for m in srv.client.get("/v1/models").json()["data"]}
    assert "train" in tasks["flux"] and "train" in tasks["zimg"]
    assert "train" not in tasks["nolora"] and "train" not in tasks["stub"]


def test_v1_models_marks_the_default_model(srv: RunningServer) -> None:
    defaults = [m["id"] for m in srv.client.get("/v1/models").json()["data"] if m["default"]]
    assert defaults == ["zimg"]


# --- on the Redis broker ------------------------------------------------------------------


def test_training_runs_on_the_redis_broker_with_progress_and_loss(
    server_factory: Callable[..., RunningServer], broker_args: Any, env: dict[str, Path]
) -> None:
    """An API node and a worker on one Redis: the train job crosses processes as a record."""
    cfg = {
        "models": {
            "zimg": {
                "backend": "z_image",
                "enabled": True,
                "model_path": str(env["zimg"]),
                "device": "cpu",
                "default_width": 64,
                "default_height": 64,
                "recommended_steps": 2,
                "lora_dir": str(env["tmp"] / "loras-redis"),
            }
        },  # fmt: skip
        "default_model": "zimg",
        "training": {"dataset_roots": [str(env["root"])]},
    }
    settings, args = broker_args(cfg, "redis")
    worker = server_factory(settings, *args, "--role", "worker")
    api = server_factory(settings, *args, "--role", "api")
    task_id = train(api.client, model="zimg", adapter_name="over-redis", steps=3)["task_id"]
    assert wait_for_step(api.client, task_id, 1)["step"] >= 1  # progress crosses from the worker
    final = wait_done(api.client, task_id, timeout=120)
    assert final["status"] == "done" and final["step"] == 3, final
    assert "loss" in final["extra"]
    assert metadata(api.client, "zimg", "over-redis")["steps"] == 3
    assert f"job {task_id} on zimg: done" in worker.log()
