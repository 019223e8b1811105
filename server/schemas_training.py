"""The wire types of LoRA training and of a model's adapters (``routes/training.py``):
a train job's request (``TrainRequest``, and image-pool's ``SeedTrainRequest`` mapped
onto it), stopping runs, the runs' status, and the adapters in a model's lora_dir."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from .schemas import Priority, SeedInt

AdapterName = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Folder name of the adapter inside the model's lora_dir; use it later as loras: [{name}].",
        examples=["my-style"],
    ),
]


class TrainRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """A LoRA training job on a loaded flux2_klein or z_image model."""

    model: Annotated[str, Meta(description="A loaded flux2_klein or z_image model with a lora_dir.")]
    dataset_dir: Annotated[
        str,
        Meta(description="A folder inside training.dataset_roots holding images, each with a same-named .txt caption."),
    ]
    adapter_name: AdapterName
    steps: Annotated[int, Meta(ge=1, le=100_000, description="Optimizer steps.")] = 500
    rank: Annotated[int, Meta(ge=1, le=256, description="LoRA rank.")] = 16
    alpha: Annotated[float, Meta(gt=0, description="LoRA alpha (scale = alpha / rank); default: the rank.")] | None = None
    learning_rate: Annotated[float, Meta(gt=0, le=1, description="AdamW learning rate.")] = 1e-4
    batch_size: Annotated[int, Meta(ge=1, le=64)] = 1
    resolution: Annotated[
        int, Meta(ge=16, le=4096, multiple_of=16, description="Images are resized to about resolution² pixels, aspect kept, sides multiples of 16.")
    ] = 512
    seed: SeedInt | None = None
    save_every: Annotated[int, Meta(ge=1, le=100_000, description="Save a checkpoint every this many steps.")] | None = None
    gradient_checkpointing: bool = False
    overwrite: Annotated[bool, Meta(description="Replace an existing adapter of the same name.")] = False
    priority: Priority = False


class SeedTrainRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """image-pool's training request (/v1/training/flux-lora, /v1/training/z-image-lora),
    mapped onto a train job.  ``output_dir`` is a folder directly inside the model's
    lora_dir (or a bare name); its last part names the adapter."""

    dataset_dir: str
    output_dir: str
    model: Annotated[str, Meta(description="Default: the first loaded model of the endpoint's backend.")] | None = None
    max_train_steps: Annotated[int, Meta(ge=1, le=100_000)] = 500
    rank: Annotated[int, Meta(ge=1, le=256)] = 16
    lora_alpha: Annotated[float, Meta(gt=0)] | None = None
    learning_rate: Annotated[float, Meta(gt=0, le=1)] = 1e-4
    train_batch_size: Annotated[int, Meta(ge=1, le=64)] = 1
    resolution: Annotated[int, Meta(ge=16, le=4096, multiple_of=16)] = 512
    seed: SeedInt | None = None
    checkpointing_steps: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    gradient_checkpointing: bool = False
    overwrite: bool = False


class StopTrainingRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    task_id: Annotated[str, Meta(description="Stop this run only; default: every unfinished run of the endpoint.")] | None = None


class TrainingRun(Struct, kw_only=True):
    task_id: str
    model: str
    adapter_name: str
    output_dir: str
    status: Literal["waiting", "running", "done", "error", "cancelled"]
    step: int
    total_steps: int
    progress: float
    loss: float | None = None
    loss_avg: Annotated[float | None, Meta(description="Mean loss over the last 20 steps.")] = None
    checkpoint_step: int | None = None
    wait_remaining: float = 0.0
    message: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


class TrainingRunsResponse(Struct, kw_only=True):
    runs: list[TrainingRun]
    active: TrainingRun | None = None


class LoraInfo(Struct, kw_only=True):
    name: str
    path: str
    metadata: dict[str, Any] | None = None


class LorasResponse(Struct, kw_only=True):
    model: str
    lora_dir: str | None
    loras: list[LoraInfo]
