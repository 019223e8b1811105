"""The Real-ESRGAN upscaler backend, on tiny random-weight checkpoints (CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.backends import create_backend
from server.backends.base import Backend, BackendError, JobCancelled, WorkItem
from server.backends.tiling import tile_boxes
from server.backends.upscale import UpscaleBackend
from server.config import ModelConfig, Settings
from server.items import Item
from tests.tiny_upscaler import write_tiny_esrgan


class RecordingContext:
    """A StepContext that records progress and never cancels."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    @property
    def cancelled(self) -> bool:
        return False

    def step(self, i: int, total: int) -> None:
        self.steps.append((i, total))

    def wants_preview(self, i: int) -> bool:
        return False

    def preview(self, image: Image.Image) -> None:
        pass


def make_backend(path: Path, **cfg: object) -> UpscaleBackend:
    model_cfg = ModelConfig(backend="upscale_esrgan", model_path=str(path), device="cpu", **cfg)  # type: ignore[arg-type]
    backend = create_backend("upscaler", model_cfg, Settings())
    assert isinstance(backend, UpscaleBackend)
    return backend


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    data = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return Image.fromarray(data.squeeze(axis=2) if len(mode) == 1 else data)


@pytest.fixture(scope="module")
def x4_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_esrgan(tmp_path_factory.mktemp("esrgan") / "RealESRGAN_x4_tiny.pth")


@pytest.fixture(scope="module")
def x4(x4_path: Path) -> Iterator[UpscaleBackend]:
    backend = make_backend(x4_path)
    backend.load()
    yield backend
    backend.unload()


def test_real_esrgan_checkpoint_loads_through_the_registry(x4: UpscaleBackend) -> None:
    assert isinstance(x4, Backend)
    assert x4.loaded and x4.model_scale == 4
    assert x4.capabilities.tasks == ("upscale",)


def test_x4_multiplies_each_side_by_four(x4: UpscaleBackend) -> None:
    out = x4.upscale(noise_image(64, 48), 4)
    assert out.size == (256, 192) and out.mode == "RGB"
    assert np.asarray(out).std() > 1  # the network really ran: not a constant image


def test_x2_on_a_x4_model_is_the_x4_result_downsampled(x4: UpscaleBackend) -> None:
    image = noise_image(64, 48)
    out = x4.upscale(image, 2)
    assert out.size == (128, 96)
    expected = x4.upscale(image, 4).resize((128, 96), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_x2_model_asked_for_x4_runs_twice(tmp_path: Path) -> None:
    backend = make_backend(write_tiny_esrgan(tmp_path / "x2.pth", scale=2, layout="esrgan"))
    backend.load()
    ctx = RecordingContext()
    (out,) = backend.run(WorkItem("upscale", Item(prompt="", width=32, height=24, steps=1, seed=0, scale=4), images=[noise_image(32, 24)]), ctx)
    assert out.size == (128, 96)
    assert ctx.steps == [(1, 2), (2, 2)]  # one step per pass (each pass fits in one tile)


def test_tiled_result_matches_untiled(x4_path: Path) -> None:
    image = noise_image(160, 120, seed=1)
    untiled = make_backend(x4_path, tile_size=0)
    tiled = make_backend(x4_path, tile_size=64)
    untiled.load()
    tiled.load()
    ctx = RecordingContext()
    (a,) = untiled.run(WorkItem("upscale", Item(prompt="", width=160, height=120, steps=1, seed=0, scale=4), images=[image]), RecordingContext())
    (b,) = tiled.run(WorkItem("upscale", Item(prompt="", width=160, height=120, steps=1, seed=0, scale=4), images=[image]), ctx)
    assert a.size == b.size == (640, 480)
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 2
    assert ctx.steps == [(i, 6) for i in range(1, 7)]  # 3 x 2 tiles, progress per tile


def test_tiles_cover_the_image_exactly() -> None:
    boxes = tile_boxes(130, 70, 64)
    covered = np.zeros((70, 130), dtype=int)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert len(boxes) == 6 and (covered == 1).all()
    assert tile_boxes(130, 70, 0) == [(0, 0, 130, 70)]


def test_alpha_is_kept(x4: UpscaleBackend) -> None:
    rgba = noise_image(32, 24, "RGBA")
    out = x4.upscale(rgba, 4)
    assert out.mode == "RGBA" and out.size == (128, 96)
    expected_alpha = rgba.getchannel("A").resize((128, 96), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(expected_alpha))
    assert x4.upscale(noise_image(32, 24, "L"), 2).mode == "RGB"


def test_unsupported_scale_is_refused(x4: UpscaleBackend) -> None:
    with pytest.raises(BackendError, match="scale must be 2 or 4"):
        x4.upscale(noise_image(16, 16), 3)


def test_input_over_max_pixels_is_refused(x4_path: Path) -> None:
    backend = make_backend(x4_path, max_pixels=1000)
    backend.load()
    with pytest.raises(BackendError, match=r"max_pixels"):
        backend.upscale(noise_image(64, 48), 4)


def test_other_tasks_and_missing_input_are_refused(x4: UpscaleBackend) -> None:
    with pytest.raises(BackendError, match="only serves upscale jobs"):
        x4.run(WorkItem("generate", Item(prompt="a cat", width=64, height=64, steps=4, seed=0)), RecordingContext())
    with pytest.raises(BackendError, match="needs one input image"):
        x4.run(WorkItem("upscale", Item(prompt="", width=64, height=64, steps=1, seed=0)), RecordingContext())


def test_unloaded_backend_says_so(x4_path: Path) -> None:
    with pytest.raises(BackendError, match="not loaded"):
        make_backend(x4_path).upscale(noise_image(16, 16), 4)


@pytest.mark.parametrize(
    ("name", "content"),
    [("garbage.pth", b"definitely not a checkpoint"), ("weights.safetensors", b"\0" * 64), ("notes.txt", b"hello")],
)
def test_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BackendError, match=f"{name} is not an upscaler checkpoint spandrel recognises"):
        make_backend(tmp_path / name).load()


def test_checkpoint_of_another_kind_of_model_is_refused(tmp_path: Path) -> None:
    path = write_tiny_esrgan(tmp_path / "denoise_x1.pth", scale=1, layout="esrgan")
    with pytest.raises(BackendError, match="is a x1 ESRGAN model, not an upscaler"):
        make_backend(path).load()


def test_missing_model_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="does not exist"):
        make_backend(tmp_path / "nope.pth").load()
    backend = create_backend("up", ModelConfig(backend="upscale_esrgan"), Settings())
    with pytest.raises(BackendError, match="has no model_path"):
        backend.load()


def test_cancel_stops_between_tiles(x4_path: Path) -> None:
    class CancelAfterFirstTile(RecordingContext):
        def step(self, i: int, total: int) -> None:
            super().step(i, total)
            raise JobCancelled()

    backend = make_backend(x4_path, tile_size=32)
    backend.load()
    ctx = CancelAfterFirstTile()
    with pytest.raises(JobCancelled):
        backend.run(WorkItem("upscale", Item(prompt="", width=96, height=64, steps=1, seed=0, scale=4), images=[noise_image(96, 64)]), ctx)
    assert ctx.steps == [(1, 6)]
    assert backend.upscale(noise_image(16, 16), 4).size == (64, 64)  # the lock was released
