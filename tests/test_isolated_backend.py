"""ModelProcess runs a real backend in a spawn child process: results, progress,
previews and cancellation cross the pipe, the child measures the model's size, and
unloading ends the process.  Every Diffusers backend runs this way by default."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
import psutil
import pytest

from server.backends import create_backend
from server.backends.base import BackendError, JobCancelled
from server.backends.memory import load_and_measure
from server.config import ConfigError, ModelConfig, Settings, build_settings
from server.families import FAMILIES, runs_isolated
from server.worker.process import ModelProcess
from tests.backend_helpers import RecordingContext, item, load_backend, max_diff, reference

if TYPE_CHECKING:
    from pathlib import Path

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = [pytest.mark.usefixtures("tiny_runtime"), pytest.mark.timeout(180)]


def test_isolated_backend_matches_in_process_and_unload_ends_the_process(tiny_z_image: Path) -> None:
    cfg = ModelConfig(backend="z_image", model_path=str(tiny_z_image))
    backend = ModelProcess("iso", cfg, Settings())
    assert backend.capabilities.tasks == ("generate", "edit")
    backend.load()
    pid = backend.pid
    assert pid is not None and psutil.pid_exists(pid)
    try:
        ctx = RecordingContext(preview_every=1)
        image = backend.run(item(width=64, height=48), ctx)[0]
        assert ctx.steps == [(1, 2), (2, 2)] and [p.size for p in ctx.previews] == [(64, 48)] * 2
        in_process = load_backend("z_image", model_path=str(tiny_z_image)).run(item(width=64, height=48), RecordingContext())
        assert max_diff(image, in_process[0]) == 0

        cancel = RecordingContext(cancel_after=1)
        with pytest.raises(JobCancelled):
            backend.run(item(steps=4), cancel)
        assert cancel.steps in ([(1, 4)], [(1, 4), (2, 4)])  # the child goes on until the answer to step 1 is in: a step at most

        with pytest.raises(BackendError, match="at least 64 px"):
            backend.run(item("edit", images=[reference(32, 32)]), RecordingContext())
        assert len(backend.run(item(), RecordingContext())) == 1  # still serving
    finally:
        backend.unload()
    assert backend.pid is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_the_model_never_waits_for_a_busy_server_at_a_step(tiny_z_image: Path) -> None:
    """The server's side of a step (progress, the GIL it shares with request handling)
    can lag: the model's process reports each step and goes on; the step times the
    server learns from are the model's own, not when the server read them."""

    class SlowServer(RecordingContext):
        def __init__(self) -> None:
            super().__init__(preview_every=2)
            self.at: list[float] = []

        def step(self, i: int, total: int, at: float | None = None) -> None:
            super().step(i, total, at)
            assert at is not None
            self.at.append(at)
            if i == 1:
                time.sleep(HELD)  # the server is busy while the model runs step 2

    backend = ModelProcess("iso", ModelConfig(backend="z_image", model_path=str(tiny_z_image)), Settings())
    backend.load()
    try:
        backend.run(item(), RecordingContext())  # the first run's one-time set-up
        ctx = SlowServer()
        images = backend.run(item(steps=4, width=64, height=48), ctx)
    finally:
        backend.unload()
    assert len(images) == 1 and ctx.steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert ctx.at[1] - ctx.at[0] < HELD / 2  # step 2 ran while the server was held on step 1
    assert [p.size for p in ctx.previews] == [(64, 48)] * 2  # asked a step ahead, drawn after steps 2 and 4


HELD = 2.0


def test_isolated_load_error_is_reported_and_leaves_no_process(tmp_path: Path) -> None:
    backend = ModelProcess("iso", ModelConfig(backend="sdxl", model_path=str(tmp_path / "missing")), Settings())
    with pytest.raises(BackendError, match="does not exist"):
        backend.load()
    assert backend.pid is None


@pytest.mark.parametrize("backend", sorted(FAMILIES))
def test_every_diffusers_backend_runs_in_its_own_process_by_default(backend: str) -> None:
    def isolated(**cfg: object) -> bool:
        return runs_isolated(msgspec.convert({"backend": backend, **cfg}, ModelConfig))

    in_process = {"stub", "upscale_esrgan"}  # the stub; an upscaler is called image by image
    assert isolated() == (backend not in in_process)
    assert not isolated(isolate=False)
    if backend != "upscale_esrgan":
        assert isolated(isolate=True)


def test_an_isolated_upscaler_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"models\.up\.isolate: an upscaler runs in the server's process"):
        build_settings({"models": {"up": {"backend": "upscale_esrgan", "isolate": True}}})


def test_the_model_process_measures_the_size_the_registry_keeps(tiny_z_image: Path) -> None:
    """On the CPU the size is the pipeline's parameters and buffers: the same figure
    whether the model is loaded here or in its own process (which measures itself)."""
    cfg = ModelConfig(backend="z_image", model_path=str(tiny_z_image), device="cpu")
    here = create_backend("here", cfg, Settings())
    child = ModelProcess("child", cfg, Settings())
    here_mib = load_and_measure(here, "here", cfg)
    child.load()
    try:
        assert here_mib is not None and here_mib > 0
        assert child.size_mib == here_mib
    finally:
        child.unload()
        here.unload()


def test_the_parent_asks_the_model_process_only_what_it_cannot_know(tiny_z_image: Path) -> None:
    """Between two jobs of a prompt run again, the worker asks the model's process
    nothing: a prompt's token count is kept, and a process that cannot measure its
    peak (the CPU) is not asked again.  Shown with the process gone: what is known
    still answers, what must be asked fails."""
    cfg = ModelConfig(backend="z_image", model_path=str(tiny_z_image), device="cpu")
    child = ModelProcess("child", cfg, Settings())
    child.load()
    try:
        counted = child.count_tokens("a red fox")
        assert counted[0] >= 3, counted
        assert child.after_job(release_cache=True) is None  # the CPU: no peak to measure
        child.kill()
        assert child.count_tokens("a red fox") == counted  # kept: no round trip
        assert child.after_job(release_cache=True) is None  # not asked: no round trip
        with pytest.raises(BackendError):
            child.count_tokens("another prompt")  # must be asked: the process is gone
    finally:
        child.unload()
