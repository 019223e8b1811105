"""Small real helpers for backend tests and benchmarks (no mocks of Diffusers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from server.backends import create_backend
from server.backends.base import Backend, JobCancelled, WorkItem
from server.config import ModelConfig, Settings
from server.items import Item


class NoopContext:
    """A ``StepContext`` that reports nowhere and is never cancelled."""

    cancelled = False

    def step(self, i: int, total: int, at: float | None = None) -> None:
        pass

    def wants_preview(self, i: int) -> bool:
        return False

    def preview(self, image: Any, i: int | None = None) -> None:
        pass


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

    def step(self, i: int, total: int, at: float | None = None) -> None:
        self.steps.append((i, total))
        if self.cancelled:
            raise JobCancelled()

    def wants_preview(self, i: int) -> bool:
        return self.preview_every > 0 and i % self.preview_every == 0

    def preview(self, image: Image.Image, i: int | None = None) -> None:
        self.previews.append(image)


def load_backend(backend: str, **cfg: Any) -> Backend:
    """Create and load a backend from model-config fields (as the registry does), in
    this process unless ``isolate=True`` (the tests look into the pipeline)."""
    cfg.setdefault("max_images", 4)
    cfg.setdefault("isolate", False)
    instance = create_backend(f"test-{backend}", ModelConfig(backend=backend, **cfg), Settings())  # type: ignore[arg-type]
    instance.load()
    return instance


DECODED = ("images", "init_image", "mask")  # WorkItem's own fields: the inputs as images


def item(task: str = "generate", **kw: Any) -> WorkItem:
    """A small, fast WorkItem: 64x64, 2 steps, seed 0; ``kw`` are ``items.Item``'s
    fields, or the decoded input images (``images``, ``init_image``, ``mask``)."""
    defaults: dict[str, Any] = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 0}
    spec = Item(**{**defaults, **{k: v for k, v in kw.items() if k not in DECODED}})
    return WorkItem(task, spec, **{k: v for k, v in kw.items() if k in DECODED})  # type: ignore[arg-type]


def reference(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def model_dir(path: Path) -> dict[str, str]:
    return {"model_path": str(path)}


def write_alternative_z_image(path: Path) -> Path:
    """A Z-Image folder assembled without ``tests/tiny_pipelines.py``'s builders: other
    component shapes and options, and pickled (``.bin``) instead of safetensors weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from tests.tiny_pipelines import qwen_tokenizer

    torch.manual_seed(42)
    pipe: Any = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000),
        vae=AutoencoderKL(
            block_out_channels=[16, 32], latent_channels=16, norm_num_groups=8, layers_per_block=2,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            scaling_factor=0.5, shift_factor=0.0,
        ),
        text_encoder=Qwen3Model(Qwen3Config(
            vocab_size=264, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=3,
            num_key_value_heads=3, head_dim=8,
        )),
        tokenizer=qwen_tokenizer(),
        transformer=ZImageTransformer2DModel(
            dim=48, n_layers=1, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=24,
            axes_dims=[8, 4, 4], axes_lens=[128, 16, 16],
        ),
    )  # fmt: skip
    # (Diffusers 0.42 writes sharded .bin files but cannot read them back, so unsharded)
    pipe.save_pretrained(path, safe_serialization=False)
    return path
