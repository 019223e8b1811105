"""Small real helpers for backend tests and benchmarks (no mocks of Diffusers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from server.backends import create_backend
from server.backends.base import Backend, JobCancelled, WorkItem
from server.config import ModelConfig, Settings


@dataclass
class RecordingContext:
    """A ``StepContext`` that records steps and previews and can cancel the job
    after ``cancel_after`` steps (the way the worker does: ``step`` raises)."""

    cancel_after: int | None = None
    preview_every: int = 0
    steps: list[tuple[int, int]] = field(default_factory=list)
    previews: list[Image.Image] = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.steps) >= self.cancel_after

    def step(self, i: int, total: int) -> None:
        self.steps.append((i, total))
        if self.cancelled:
            raise JobCancelled()

    def wants_preview(self, i: int) -> bool:
        return self.preview_every > 0 and i % self.preview_every == 0

    def preview(self, image: Image.Image) -> None:
        self.previews.append(image)


def load_backend(backend: str, **cfg: Any) -> Backend:
    """Create and load a backend from model-config fields (as the registry does)."""
    cfg.setdefault("max_images", 4)
    instance = create_backend(f"test-{backend}", ModelConfig(backend=backend, **cfg), Settings())  # type: ignore[arg-type]
    instance.load()
    return instance


def item(task: str = "generate", **kw: Any) -> WorkItem:
    """A small, fast WorkItem: 64x64, 2 steps, seed 0."""
    defaults: dict[str, Any] = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 0}
    return WorkItem(task=task, **{**defaults, **kw})  # type: ignore[arg-type]


def reference(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def model_dir(path: Path) -> dict[str, str]:
    return {"model_path": str(path)}
