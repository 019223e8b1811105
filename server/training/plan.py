"""A validated training request, as it travels on the job record (no torch here)."""

from __future__ import annotations

from msgspec import Struct


class Sample(Struct, frozen=True):
    image: str  # path of the training image
    caption: str


class TrainPlan(Struct, frozen=True, kw_only=True):
    """Built before queueing (``training.submit``), run by ``training.lora_trainer``."""

    model: str
    backend: str
    base_model: str | None
    dataset: str
    samples: list[Sample]
    adapter_name: str
    output: str  # lora_dir / adapter_name
    steps: int
    rank: int
    alpha: float
    learning_rate: float
    batch_size: int
    resolution: int
    seed: int
    save_every: int | None
    gradient_checkpointing: bool
