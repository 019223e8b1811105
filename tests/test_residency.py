"""Model residency (server/residency.py): memory budgets with LRU eviction of idle
models, load_on_demand, idle_unload_seconds, and a model bigger than its budget.

Stub models report a size through ``simulate_size_mib`` and take
``simulate_load_seconds`` to load; one real tiny pipeline checks the measured size."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .servers import BROKERS, RunningServer
from .test_api import wait_done

pytest_plugins = ["tests.backend_fixtures"]

def stub(**extra: Any) -> dict[str, Any]:
    cfg = {"backend": "stub", "tasks": ["generate", "edit"], "default_width": 64, "default_height": 64,
           "recommended_steps": 2, "simulate_step_seconds": 2.0}  # fmt: skip
    cfg.update(extra)
    return cfg


SETTINGS: dict[str, Any] = {
    "models": {
        "a": stub(load_on_demand=True, simulate_size_mib=600, simulate_load_seconds=0.5),
        "b": stub(load_on_demand=True, simulate_size_mib=600, simulate_load_seconds=0.5),
        "c": stub(enabled=True, device="other", idle_unload_seconds=1.0),  # no budget on its device
        "huge": stub(load_on_demand=True, simulate_size_mib=5000),
    },
    "default_model": "a",
    "residency": {"memory_budget_mib": {"cpu": 1000}},
    "broker": {"heartbeat_seconds": 0.2, "lease_seconds": 5.0},
}


@pytest.fixture(scope="module", params=BROKERS)
def srv(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    settings, args = broker_args(SETTINGS, request.param)
    return server_factory(settings, *args)


def states(c: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c.get("/v1/admin/models").json()["models"]}


def generate(c: httpx.Client, model: str, **extra: Any) -> dict[str, Any]:
    r = c.post("/api/generate", json={"prompt": f"on {model}", "model": model, "steps": 2, **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


class Watch:
    """Polls /v1/admin/models in the background: which budgeted models were ever resident together."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)
        self.together: list[set[str]] = []
        self.seen: list[dict[str, str]] = []  # the states when both were resident
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            st = states(self.client)
            resident = {n for n in ("a", "b") if st[n]["state"] in ("loaded", "loading")}
            self.together.append(resident)
            if len(resident) > 1:
                self.seen.append({n: st[n]["state"] for n in ("a", "b")})
            self.stop.wait(0.02)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.client.close()


def test_alternating_models_within_a_budget_for_one_all_complete(srv: RunningServer) -> None:
    c = srv.client
    with Watch(srv.url) as watch:
        for model in ("a", "b", "a", "b"):  # one after the other
            st = wait_done(c, generate(c, model)["task_id"])
            assert st["status"] == "done", st
        ids = [generate(c, model)["task_id"] for model in ("a", "b", "a", "b")]  # all queued at once: no 409
        for tid in ids:
            st = wait_done(c, tid, timeout=60)
            assert st["status"] == "done", st
    assert watch.together and max(len(s) for s in watch.together) == 1, f"a and b were resident at once: {watch.seen}"
    assert {"a"} in watch.together and {"b"} in watch.together
    assert "unloading idle model" in srv.log()


def test_load_on_demand_forecast_includes_the_learned_load_time(srv: RunningServer) -> None:
    c = srv.client
    assert wait_done(c, generate(c, "a")["task_id"])["status"] == "done"  # a has loaded at least once
    assert wait_done(c, generate(c, "b")["task_id"])["status"] == "done"  # b evicts a
    st = states(c)
    assert st["a"]["state"] == "unloaded" and st["a"]["load_seconds"] >= 0.5
    job = generate(c, "a")
    prior_job = 2 * (64 * 64 / 1e6) * 2.0  # the stub's prior for 2 steps at 64x64
    assert job["expected_time_seconds"] >= 0.5 + prior_job * 0.5, job
    assert wait_done(c, job["task_id"])["status"] == "done"


def test_idle_model_unloads_on_time(srv: RunningServer) -> None:
    c = srv.client
    if states(c)["c"]["state"] != "loaded":
        assert c.post("/v1/admin/models/c/load").status_code == 200
    assert wait_done(c, generate(c, "c")["task_id"])["status"] == "done"
    done = time.monotonic()
    while states(c)["c"]["state"] == "loaded":
        assert time.monotonic() - done < 5, "c was not unloaded after idle_unload_seconds"
        time.sleep(0.05)  # polling a state across processes: no event to await
    assert 0.8 <= time.monotonic() - done <= 2.5
    assert "idle_unload_seconds" in srv.log()


def test_a_model_bigger_than_its_budget_is_a_clear_error(srv: RunningServer) -> None:
    c = srv.client
    st = wait_done(c, generate(c, "huge")["task_id"])
    assert st["status"] == "error"
    message = st["message"] or ""
    assert "memory_budget_mib['cpu'] is 1000 MiB" in message and "4000 MiB over" in message, st
    model = states(c)["huge"]
    assert model["state"] == "error" and "4000 MiB over" in model["load_error"]


def test_measured_size_of_a_real_tiny_pipeline(server_factory: Callable[..., RunningServer], tiny_flux2_klein: Any) -> None:
    settings = {
        "models": {"klein": {"backend": "flux2_klein", "model_path": str(tiny_flux2_klein), "enabled": True,
                             "device": "cpu", "default_width": 64, "default_height": 64, "recommended_steps": 2}},
        "residency": {"memory_budget_mib": {"cpu": 100}},  # far more than the tiny pipeline
    }  # fmt: skip
    srv = server_factory(settings, env={"HF_HUB_OFFLINE": "1"})
    model = states(srv.client)["klein"]
    assert model["state"] == "loaded", model
    assert 0 < model["size_mib"] < 100 and model["load_seconds"] > 0


@pytest.mark.parametrize("cache_size", [4, 1])
def test_loras_stay_resident_and_switch_per_job(tiny_flux2_klein: Any, tiny_root: Any, cache_size: int) -> None:
    from server.backends.lora import cached_adapters
    from server.items import Lora

    from . import tiny_pipelines as tp
    from .backend_helpers import RecordingContext, item, load_backend, max_diff

    lora_dir = tiny_root / f"loras_alternating_{cache_size}"
    tp.make_lora("flux2_klein", tiny_flux2_klein, lora_dir / "one", seed=1)
    tp.make_lora("flux2_klein", tiny_flux2_klein, lora_dir / "two", seed=2)

    backend: Any = load_backend("flux2_klein", model_path=str(tiny_flux2_klein), lora_dir=str(lora_dir), lora_cache_size=cache_size)
    try:
        def run(*loras: str) -> Any:
            return backend.run(item(loras=[Lora(n, 1.0) for n in loras]), RecordingContext())[0]

        base, one, two, one_again, base_again = run(), run("one"), run("two"), run("one"), run()
        assert max_diff(one, two) > 0 and max_diff(one, base) > 0
        assert max_diff(one, one_again) == 0 and max_diff(base, base_again) == 0  # switched, not mixed
        kept = cached_adapters(backend.pipe)
        assert len(kept) == min(2, cache_size) and "one" in kept[-1]
    finally:
        backend.unload()


def test_a_wrapper_tensor_counts_the_tensors_it_holds() -> None:
    """A torchao float8 weight is a wrapper tensor: no storage of its own
    (``data_ptr()`` 0), its bytes in the tensors ``__tensor_flatten__`` names."""
    import torch

    from server.backends.memory import tensor_bytes

    class Float8Like(torch.Tensor):
        @staticmethod
        def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor) -> Float8Like:
            return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=torch.bfloat16)  # type: ignore[attr-defined,no-any-return]

        def __init__(self, qdata: torch.Tensor, scale: torch.Tensor) -> None:
            self.qdata, self.scale = qdata, scale

        def __tensor_flatten__(self) -> tuple[list[str], None]:
            return ["qdata", "scale"], None

        @classmethod
        def __torch_dispatch__(cls, func: object, types: object, args: object = (), kwargs: object = None) -> object:
            raise NotImplementedError(func)

    seen: set[int] = set()
    weights = [Float8Like(torch.zeros(10, 10, dtype=torch.float8_e4m3fn), torch.ones(10)) for _ in range(3)]
    assert all(w.data_ptr() == 0 for w in weights)
    assert sum(tensor_bytes(w, seen) for w in weights) == 3 * (100 * 1 + 10 * 4)  # not one weight's worth
    shared = torch.ones(5)
    assert tensor_bytes(shared, seen) == 20 and tensor_bytes(shared, seen) == 0  # a shared tensor counts once


# ----------------------------------------------------------------------------- the upscaler in the server's process


def upscaler_host(tmp_path: Any, budget: int) -> Any:
    """A model host with the tiny Real-ESRGAN upscaler and two stubs, all in this
    process (as on a worker: the upscaler never runs in a process of its own)."""
    from server.config import build_settings
    from server.worker.host import ModelHost
    from tests.tiny_upscaler import write_tiny_esrgan

    path = write_tiny_esrgan(tmp_path / "RealESRGAN_x4_tiny.pth")
    settings = build_settings({
        "models": {
            "up": {"backend": "upscale_esrgan", "model_path": str(path), "device": "cpu"},
            "gen": stub(simulate_size_mib=400),
            "other": stub(simulate_size_mib=500),
        },
        "upscaler": "up",
        "residency": {"memory_budget_mib": {"cpu": budget}},
    })  # fmt: skip
    return ModelHost.alone(settings)


def test_the_upscalers_peak_after_a_lease_counts_once_beside_its_process_models(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upscaler's peak (tiles, CUDA context) is measured after each post-processing
    lease; the process's peak also covers the generation model's 400 MiB of weights,
    which are not counted twice.  300 MiB of tiles fit the 1000 MiB budget beside it;
    700 MiB do not, and the idle generation model is unloaded."""
    from PIL import Image

    from server.backends import upscale

    process_peak: list[float] = []
    monkeypatch.setattr(upscale, "peak_mib", lambda device: process_peak[-1] if process_peak else None)  # CUDA's figure

    async def scenario() -> None:
        host = upscaler_host(tmp_path, 1000)
        gen = await host.load("gen")
        async with host.leases.lease("up") as backend:
            up = host.registry.get("up")
            assert up.weights_mib is not None and 0 < up.weights_mib < 10  # the checkpoint's module, measured
            weights = up.weights_mib
            process_peak.append(400 + weights + 300)  # gen's weights, the upscaler's, 300 MiB of its tiles and context
            backend.upscale(Image.new("RGB", (32, 32), (90, 40, 200)), 2)
        assert up.size_mib == pytest.approx(weights + 300)
        assert gen.state == "loaded"  # 400 + weights + 300 <= 1000
        async with host.leases.lease("up") as backend:
            process_peak.append(400 + weights + 700)
            backend.upscale(Image.new("RGB", (32, 32), (90, 40, 200)), 2)
        assert up.size_mib == pytest.approx(weights + 700)
        assert (gen.state, up.state) == ("unloaded", "loaded")  # 1100 + weights > 1000: the idle model made room

    import anyio

    anyio.run(scenario)


def test_a_lent_upscaler_is_not_evicted_to_make_room(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upscaler (300 MiB at its peak) is the least recently used model, and
    unloading it would make room, but it is lent out (a post-processing step runs):
    loading another model unloads the idle one instead."""
    from PIL import Image

    from server.backends import upscale

    async def scenario() -> None:
        host = upscaler_host(tmp_path, 1000)
        async with host.leases.lease("up") as backend:
            up = host.registry.get("up")
            monkeypatch.setattr(upscale, "peak_mib", lambda device: (up.weights_mib or 0.0) + 300)
            backend.upscale(Image.new("RGB", (32, 32), (90, 40, 200)), 2)
        async with host.leases.lease("up"):
            gen = await host.load("gen")
            host.residency.touch("gen")  # used after the upscaler: the upscaler is the least recently used
            other = await host.load("other")  # 400 + 500 + the upscaler's 300 and weights > 1000: one must go
            assert (other.state, gen.state, up.state) == ("loaded", "unloaded", "loaded")

    import anyio

    anyio.run(scenario)
