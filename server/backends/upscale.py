"""Real-ESRGAN-family upscaler (backend key ``upscale_esrgan``).

Loads a ``.pth`` / ``.safetensors`` super-resolution checkpoint with spandrel,
which detects the architecture (ESRGAN/RRDBNet, Real-ESRGAN compact, SwinIR...).

* ``model_path``: the checkpoint file.  ``device``: ``auto`` = cuda when available,
  else cpu.  ``torch_dtype``: ``auto`` = float16 on cuda (when the architecture
  supports it); ``float16``/``bfloat16`` apply on cuda only — cpu always runs
  float32.  ``tile_size``: input tile edge in pixels (0 = whole image at once);
  tiles overlap by ``TILE_OVERLAP`` pixels of context so that seams do not show.
* Scale: the requested scale (2 or 4) is reached by running the model as many
  times as needed and then resizing down with Lanczos, so a x4 model asked for x2
  upscales x4 and downsamples by 2 (sharper than a x2 resize of the input); a x2
  model asked for x4 runs twice.
* Alpha: an input with an alpha channel gives an RGBA result (colour through the
  model, alpha resized with Lanczos); anything else gives RGB.
* ``max_pixels`` bounds the *input* image.

Interface: ``UpscaleBackend(name, cfg, settings)`` with ``load()``, ``unload()``,
``run(item, ctx)`` (task ``upscale``: ``item.images[0]`` is the input,
``item.spec.scale`` 2 or 4) and ``upscale(image, scale, progress=None)`` for
post-processing steps (thread-safe; call off the event loop).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from spandrel import ImageModelDescriptor, ModelLoader, ModelTiling

from .base import BackendError, Capabilities, StepContext, WorkItem, count_words
from .memory import peak_mib
from .memory import release_cache as release_cached_blocks
from .tiling import Pixels, Progress, run_tiled, tile_boxes

if TYPE_CHECKING:
    from ..config import ModelConfig, Settings

SCALES = (2, 4)
TILE_OVERLAP = 16  # input pixels of context around each tile
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UpscaleBackend:
    isolated = False  # always in the server's process: a generate job's post-processing calls it image by image
    capabilities = Capabilities(tasks=("upscale",), max_images=1, max_output_images=1)

    def __init__(self, name: str, cfg: ModelConfig, settings: Settings) -> None:
        self.name = name
        self.cfg = cfg
        self.tile = cfg.tile_size
        self._model: ImageModelDescriptor | None = None
        self._device = "cpu"
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model_scale(self) -> int:
        return int(self._require_model().scale)

    def load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            path = self._checkpoint_path()
            self._device = self._pick_device()
            descriptor = self._read_checkpoint(path)
            self._model = descriptor.to(self._device).to(self._pick_dtype(descriptor)).eval()

    def unload(self) -> None:
        with self._lock:
            self._model = None
        if self._device.startswith("cuda"):
            torch.cuda.empty_cache()

    def count_tokens(self, prompt: str) -> tuple[int, int | None]:
        return count_words(prompt)  # no text encoder

    def after_job(self, release_cache: bool) -> float | None:
        if release_cache:
            release_cached_blocks(self._device)
        return peak_mib(self._device)

    def cost_prior(self, fit: str) -> dict[str, float] | None:
        # seconds ~ 0.2 + input megapixels (one "step" of the input's size) times
        # ~1.5 s/MP on a recent GPU (full-size x4plus), ~370 s/MP on 2 CPU cores
        return {"job": 0.2, "step_mp": 2.0 if self._device.startswith("cuda") else 400.0}

    def run(self, item: WorkItem, ctx: StepContext) -> list[Image.Image]:
        if item.task != "upscale":
            raise BackendError(f"model {self.name!r} is an upscaler; it only serves upscale jobs, not {item.task}")
        if not item.images:
            raise BackendError("an upscale job needs one input image")
        scale = item.spec.scale or 4
        return [self.upscale(item.images[0], scale, progress=ctx.step)]

    def upscale(self, image: Image.Image, scale: int, progress: Progress | None = None) -> Image.Image:
        """``image`` enlarged ``scale`` (2 or 4) times; see the module docstring."""
        if scale not in SCALES:
            raise BackendError(f"upscale scale must be 2 or 4, not {scale!r}")
        width, height = image.size
        if width * height > self.cfg.max_pixels:
            raise BackendError(
                f"the image is {width}x{height} ({width * height / 1e6:.1f} MP); model {self.name!r} accepts at "
                f"most {self.cfg.max_pixels / 1e6:.1f} MP (models.{self.name}.max_pixels)"
            )
        has_alpha = image.mode in ALPHA_MODES or "transparency" in image.info
        alpha = image.convert("RGBA").getchannel("A") if has_alpha else None
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        with self._lock:
            pixels = self._run_passes(pixels, scale, progress)
        result = Image.fromarray(pixels)  # H x W x 3 uint8: RGB
        size = (width * scale, height * scale)
        if result.size != size:
            result = result.resize(size, Image.Resampling.LANCZOS)
        if alpha is not None:
            result.putalpha(alpha.resize(size, Image.Resampling.LANCZOS))
        return result

    # -- internals ---------------------------------------------------------

    def _require_model(self) -> ImageModelDescriptor:
        if self._model is None:
            raise BackendError(f"upscaler {self.name!r} is not loaded; load it first")
        return self._model

    def _run_passes(self, pixels: Pixels, scale: int, progress: Progress | None) -> Pixels:
        """Run the model until the image is at least ``scale`` times larger; progress
        is reported per tile over all passes."""
        model = self._require_model()
        tile = 0 if model.tiling == ModelTiling.INTERNAL else self.tile  # the model tiles itself
        passes = max(1, math.ceil(math.log(scale, model.scale) - 1e-9))
        height, width = pixels.shape[:2]
        counts = [len(tile_boxes(width * model.scale**k, height * model.scale**k, tile)) for k in range(passes)]
        done = 0
        for count in counts:
            step = None if progress is None else (lambda i, _n, base=done: progress(base + i, sum(counts)))
            pixels = run_tiled(self._forward, pixels, model.scale, tile, TILE_OVERLAP, step)
            done += count
        return pixels

    @torch.inference_mode()
    def _forward(self, patch: Pixels) -> Pixels:
        model = self._require_model()
        tensor = torch.from_numpy(patch.copy()).to(self._device)  # copy: patch is a view
        tensor = tensor.permute(2, 0, 1).unsqueeze(0).to(model.dtype).div_(255)
        try:
            out = model(tensor)
        except torch.OutOfMemoryError:
            raise BackendError(
                f"out of GPU memory while upscaling a {patch.shape[1]}x{patch.shape[0]} tile; "
                f"lower models.{self.name}.tile_size (now {self.tile})"
            ) from None
        out = out.squeeze(0).permute(1, 2, 0).float().mul_(255).round_().clamp_(0, 255)
        result: Pixels = out.to(torch.uint8).cpu().numpy()
        return result

    def _checkpoint_path(self) -> Path:
        if not self.cfg.model_path:
            raise BackendError(f"model {self.name!r} has no model_path; set it to a Real-ESRGAN .pth or .safetensors file")
        path = Path(self.cfg.model_path).expanduser()
        if not path.is_file():
            raise BackendError(f"model {self.name!r}: the upscaler checkpoint {path} does not exist")
        return path

    def _read_checkpoint(self, path: Path) -> ImageModelDescriptor:
        try:
            descriptor = ModelLoader(device="cpu").load_from_file(path)
        except Exception as exc:  # torch/pickle/safetensors/spandrel all raise their own types
            raise BackendError(
                f"model {self.name!r}: {path.name} is not an upscaler checkpoint spandrel recognises "
                f"({type(exc).__name__}: {str(exc)[:200]}); use a Real-ESRGAN-family .pth or .safetensors file"
            ) from None
        if not isinstance(descriptor, ImageModelDescriptor) or descriptor.scale < 2:
            kind = f"a x{descriptor.scale} " if isinstance(descriptor, ImageModelDescriptor) else "an inpainting "
            raise BackendError(
                f"model {self.name!r}: {path.name} is {kind}{descriptor.architecture.name} model, not an upscaler "
                "(x2 or more); use a super-resolution checkpoint such as RealESRGAN_x4plus"
            )
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise BackendError(f"model {self.name!r}: {path.name} is not an RGB model; only RGB upscalers are supported")
        return descriptor

    def _pick_device(self) -> str:
        device = self.cfg.device
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"model {self.name!r} asks for device {device!r} but CUDA is not available; use 'cpu' or 'auto'")
        return device

    def _pick_dtype(self, descriptor: ImageModelDescriptor) -> torch.dtype:
        wanted = self.cfg.torch_dtype
        if not self._device.startswith("cuda") or wanted == "float32":
            return torch.float32
        if wanted == "bfloat16" and descriptor.supports_bfloat16:
            return torch.bfloat16
        if wanted in ("auto", "float16") and descriptor.supports_half:
            return torch.float16
        return torch.float32
