"""Samplers: A1111's sampler and schedule names run as the Diffusers schedulers
``server/samplers.py`` maps them to, on the tiny pipelines (from_pretrained, real
Diffusers), per job, and through /api/generate and /sdapi/v1 of a running server."""

from __future__ import annotations

import base64
import functools
import io
import json
from typing import TYPE_CHECKING, Any

import pytest

from server import samplers
from server.backends.base import BackendError, BatchSteps, JobCancelled
from server.samplers import Unsupported, choose
from tests.backend_helpers import RecordingContext, item, load_backend, max_diff, reference
from tests.servers import ROOT, stub_settings
from tests.test_api import wait_done

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    import httpx
    from PIL.Image import Image

    from server.backends.base import Backend, WorkItem
    from tests.servers import RunningServer

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = pytest.mark.timeout(300)

FLOW = ("flux2_klein", "z_image", "qwen_edit_gguf")


# ------------------------------------------------------------------ the table


def test_a1111_names_resolve_as_a1111_resolves_them() -> None:
    assert choose("sdxl", "DPM++ 2M Karras", None).stored == ("DPM++ 2M", "karras")  # the older name carries it
    assert choose("sdxl", "dpm++ 2m", "Automatic").stored == ("DPM++ 2M", "karras")  # automatic: the sampler's own
    assert choose("sdxl", "DPM++ 2M SDE", None).stored == ("DPM++ 2M SDE", "exponential")
    assert choose("sdxl", "k_euler_a", None).stored == ("Euler a", None)  # automatic: the model's own
    assert choose("sdxl", "Euler", "SGM Uniform").stored == ("Euler", "sgm_uniform")
    assert choose("sdxl", None, None).stored == (None, None)
    assert choose("sdxl", "DPM++ 2M", "Karras").flags["use_karras_sigmas"] is True
    assert choose("sdxl", "DPM++ 2M", "uniform").flags == {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                          **samplers.SCHEDULES["uniform"].flags}  # fmt: skip
    assert [samplers.timesteps(s, 10) for s in ("Heun", "PLMS", "Euler", None)] == [19, 11, 10, 10]


@pytest.mark.parametrize(("backend", "sampler", "schedule", "param", "listed"), [
    ("sdxl", "Restart", None, "sampler", "DPM++ 2M"),  # A1111's, without a Diffusers counterpart
    ("sdxl", "DDIM", "Karras", "scheduler", "SGM Uniform"),  # DDIM has no sigma schedules
    ("sdxl", "Euler", "Polyexponential", "scheduler", "Exponential"),
    ("sdxl", None, "karras", "sampler", "Euler a"),  # a schedule needs a sampler
    ("flux2_klein", "DPM++ 2M", None, "sampler", "Euler"),  # flow matching: its own
    ("z_image", "Euler", "SGM Uniform", "scheduler", "Karras"),
])  # fmt: skip
def test_what_a_family_does_not_run_is_refused_with_what_it_does(
    backend: str, sampler: str | None, schedule: str | None, param: str, listed: str
) -> None:
    with pytest.raises(Unsupported) as exc:
        choose(backend, sampler, schedule)
    assert exc.value.param == param and exc.value.code == f"unknown_{param}" and listed in str(exc.value)


def test_the_sampler_is_part_of_what_jobs_must_share_to_batch() -> None:
    from server.items import Item
    from server.jobs import JobRecord, batch_key

    def key(sampler: str | None, scheduler: str | None = None) -> str:
        it = Item(prompt="x", width=64, height=64, steps=2, seed=1, sampler=sampler, scheduler=scheduler)
        return batch_key(JobRecord(model="m", task="generate", items=[it]), True)

    assert key("Euler") == key("Euler") and len({key(None), key("Euler"), key("Euler a"), key("Euler", "karras")}) == 4


# ------------------------------------------------------------------ on the tiny pipelines


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs: dict[str, Path], tiny_runtime: None) -> Iterator[dict[str, Backend]]:
    backends = {b: load_backend(b, model_path=str(tiny_model_dirs[b])) for b in ("sdxl", *FLOW)}
    yield backends
    for backend in backends.values():
        backend.unload()


def work(backend: str, **kw: Any) -> WorkItem:
    if backend == "qwen_edit_gguf":  # edits only
        return item("edit", images=[reference()], **kw)
    return item("generate", **kw)


def run(backend: Backend, w: WorkItem) -> Image:
    return backend.run(w, RecordingContext())[0]


@pytest.fixture
def used(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """(class, config) of every scheduler whose timesteps a pipeline set: a hook on the
    real Diffusers classes (they still run)."""
    import diffusers

    seen: list[tuple[str, dict[str, Any]]] = []
    for name in {s.scheduler for table in samplers.TABLES.values() for s in table}:
        cls = getattr(diffusers, name)
        original = cls.set_timesteps

        monkeypatch.setattr(cls, "set_timesteps", recording(original, seen))
    return seen


def recording(original: Any, seen: list[tuple[str, dict[str, Any]]]) -> Any:
    @functools.wraps(original)  # the pipelines read its signature (sigmas=, mu=)
    def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append((type(self).__name__, dict(self.config)))
        return original(self, *args, **kwargs)

    return hooked


PAIRS = [(b, s.name, sched) for b in ("sdxl", *FLOW) for s in samplers.samplers(b) for sched in ("automatic", *s.schedules)]


@pytest.mark.parametrize(("backend", "sampler", "schedule"), PAIRS)
def test_every_listed_sampler_and_schedule_runs_as_its_scheduler(
    loaded: dict[str, Backend], used: list[tuple[str, dict[str, Any]]], backend: str, sampler: str, schedule: str
) -> None:
    choice = choose(backend, sampler, schedule)
    stored_sampler, stored_schedule = choice.stored
    steps = 3 if sampler == "DPM++ 3M SDE" else 2
    ctx = RecordingContext()
    image = loaded[backend].run(work(backend, sampler=stored_sampler, scheduler=stored_schedule, steps=steps), ctx)[0]
    assert image.size == (64, 64)
    assert used and used[-1][0] == choice.sampler.scheduler  # type: ignore[union-attr]
    for key, value in choice.flags.items():
        assert used[-1][1][key] == value, key
    # the timesteps the pipeline ran (Heun: 2n - 1), as the job's total counts them
    assert ctx.steps[-1][1] == samplers.timesteps(stored_sampler, steps) == work(backend, sampler=stored_sampler, steps=steps).run_steps


def test_samplers_change_the_image_and_reproduce_with_the_seed(loaded: dict[str, Backend]) -> None:
    sdxl = loaded["sdxl"]
    euler = run(sdxl, item(sampler="Euler", seed=3))
    assert max_diff(euler, run(sdxl, item(sampler="Euler", seed=3))) == 0
    ancestral = run(sdxl, item(sampler="Euler a", seed=3))
    dpm = run(sdxl, item(sampler="DPM++ 2M", scheduler="karras", seed=3))
    assert max_diff(euler, ancestral) > 0 and max_diff(euler, dpm) > 0 and max_diff(ancestral, dpm) > 0
    assert max_diff(dpm, run(sdxl, item(sampler="DPM++ 2M", scheduler="karras", seed=3))) == 0
    sde = run(sdxl, item(sampler="DPM++ 2M SDE", scheduler="exponential", seed=3))  # its noise comes from the seed too
    assert max_diff(sde, run(sdxl, item(sampler="DPM++ 2M SDE", scheduler="exponential", seed=3))) == 0


def test_the_loaded_scheduler_is_unchanged_by_a_job_with_another_sampler(loaded: dict[str, Backend]) -> None:
    sdxl: Any = loaded["sdxl"]
    own, config = sdxl.pipe.scheduler, dict(sdxl.pipe.scheduler.config)
    before = run(sdxl, item(seed=5))
    run(sdxl, item(sampler="DPM2 a", scheduler="karras", seed=5))
    assert sdxl.pipe.scheduler is own and dict(own.config) == config
    assert type(own).__name__ == "EulerDiscreteScheduler" and sdxl.pipe.config["scheduler"][1] == "EulerDiscreteScheduler"
    assert max_diff(before, run(sdxl, item(seed=5))) == 0  # the next job without a sampler: as before
    with pytest.raises(JobCancelled):  # a call stopped midway puts it back too
        sdxl.run(item(sampler="Euler", seed=5), RecordingContext(cancel_after=1))
    assert sdxl.pipe.scheduler is own


def test_a_batch_shares_one_sampler(loaded: dict[str, Backend]) -> None:
    sdxl: Any = loaded["sdxl"]
    a, b = item(sampler="DPM++ 2M", scheduler="karras", seed=1), item(sampler="DPM++ 2M", scheduler="karras", seed=2)
    together = sdxl.run_batch([a, b], BatchSteps([RecordingContext(), RecordingContext()]))
    assert max_diff(together[1][0], run(sdxl, b)) <= 1  # image k of a batch: as alone
    assert max_diff(together[0][0], run(sdxl, item(seed=1))) > 0  # and not the model's own scheduler
    with pytest.raises(BackendError, match="cannot share a pipeline call"):
        sdxl.run_batch([a, item(sampler="Euler", seed=2)], BatchSteps([RecordingContext(), RecordingContext()]))


# ------------------------------------------------------------------ through the server


@pytest.fixture(scope="module")
def srv(server_factory: Callable[..., RunningServer], tiny_model_dirs: dict[str, Path]) -> RunningServer:
    settings = stub_settings()
    common = {"default_width": 64, "default_height": 64, "recommended_steps": 2}  # isolated, as by default
    settings["models"]["sdxl"] = {"backend": "sdxl", "model_path": str(tiny_model_dirs["sdxl"]), "enabled": True, **common}
    settings["models"]["flux"] = {"backend": "flux2_klein", "model_path": str(tiny_model_dirs["flux2_klein"]),
                                  "load_on_demand": True, **common}  # fmt: skip
    settings["default_model"] = "sdxl"
    return server_factory(settings, env={"OMP_NUM_THREADS": "1"}, script=ROOT / "tests" / "tiny_server.py")


def generate(c: httpx.Client, **body: Any) -> bytes:
    r = c.post("/api/generate", json={"prompt": "a red fox", "seed": 11, "steps": 2, **body})
    assert r.status_code == 200, r.text
    st = wait_done(c, r.json()["task_id"], timeout=120)
    assert st["status"] == "done", st
    return c.get("/api/image", params={"task_id": st["task_id"]}).content


def decoded(png: bytes) -> bytes:
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(png)) as img:
        return img.tobytes()


def test_sdapi_runs_the_sampler_asked_for_as_api_generate_does(srv: RunningServer) -> None:
    c = srv.client
    listed = [s["name"] for s in c.get("/sdapi/v1/samplers").json()]
    assert listed == [s.name for s in samplers.EPSILON] and "Restart" not in listed  # the default model's: sdxl
    assert "karras" in [s["name"] for s in c.get("/sdapi/v1/schedulers").json()]
    body = {"prompt": "a red fox", "seed": 11, "steps": 2, "width": 64, "height": 64, "sampler_name": "DPM++ 2M Karras"}
    r = c.post("/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sampler_honoured"] and (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]
    image = base64.b64decode(r.json()["images"][0])
    dpm = generate(c, sampler="DPM++ 2M", scheduler="Karras")
    assert decoded(image) == decoded(dpm)  # the one sampler, whichever API asked
    euler = decoded(generate(c, sampler="Euler"))
    assert decoded(dpm) != euler and euler == decoded(generate(c))  # the tiny SDXL ships Euler: its own
    # the file carries it, and png-info reads it back as generate fields
    read = c.post("/api/png-info", json={"image": base64.b64encode(dpm).decode()}).json()
    assert (read["sampler"], read["scheduler"]) == ("DPM++ 2M", "Karras")
    assert decoded(generate(c, sampler=read["sampler"], scheduler=read["scheduler"])) == decoded(dpm)


def test_unknown_samplers_are_ignored_on_sdapi_and_a_400_on_api_generate(srv: RunningServer) -> None:
    c = srv.client
    body = {"prompt": "a red fox", "seed": 11, "steps": 2, "width": 64, "height": 64, "sampler_name": "DPM fast"}
    r = c.post("/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "sampler_name" in info["ignored"] and info["sampler_honoured"] is False
    assert decoded(base64.b64decode(r.json()["images"][0])) == decoded(generate(c))  # the model's own scheduler
    r = c.post("/api/generate", json={"prompt": "x", "sampler": "DPM fast"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_sampler" and r.json()["error"]["param"] == "sampler"
    assert "DPM++ 2M" in r.json()["error"]["message"] and "Euler a" in r.json()["error"]["message"]
    r = c.post("/api/generate", json={"prompt": "x", "sampler": "DDIM", "scheduler": "Karras"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_scheduler", r.text
    r = c.post("/api/generate", json={"prompt": "x", "model": "flux", "sampler": "Euler a"})
    assert r.status_code == 400 and "use one of: Euler" in r.json()["error"]["message"]
    models = {m["name"]: m for m in c.get("/api/ls").json()["models"]}
    assert models["flux"]["samplers"] == ["Euler"] and "DPM++ 2M SDE" in models["sdxl"]["samplers"]
