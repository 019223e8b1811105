"""TrainRequest -> a queued "train" job, after every check that can be made before
it runs: the model can train and has a lora_dir, the adapter name is free, and the
dataset is inside the allowed roots, captioned and readable.

Nothing here imports torch: the worker does, when it runs the job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from ..build import parse_priority, parse_seed
from ..errors import BadRequest, Conflict
from ..families import TRAINABLE
from ..forecast import call_features
from ..jobs import JobRecord
from .adapters import adapter_dir, has_weights
from .dataset import validate_dataset
from .plan import TrainPlan

if TYPE_CHECKING:
    from ..registry import ModelState
    from ..schemas_training import TrainRequest
    from ..service import Service


def check_trainable(ms: ModelState) -> str:
    """The model's lora_dir, or a 400 saying why the model cannot train."""
    cfg = ms.cfg
    if cfg.backend not in TRAINABLE:
        raise BadRequest(
            f"model {ms.name!r} (backend {cfg.backend}) cannot train LoRAs; training supports "
            f"{' and '.join(TRAINABLE)} models",
            param="model",
        )
    if not cfg.lora_dir:
        raise BadRequest(
            f"model {ms.name!r} has no lora_dir configured, so a trained adapter has nowhere to go; "
            "set lora_dir in the model's settings",
            param="model",
        )
    if cfg.target_inflight > 1:
        raise BadRequest(
            f"training needs model {ms.name!r} to itself, but its target_inflight is {cfg.target_inflight}; "
            "set target_inflight to 1 to train",
            param="model",
        )
    if cfg.offload == "sequential":
        raise BadRequest(
            f"model {ms.name!r} uses offload 'sequential', which training does not support; use 'model' or 'none'",
            param="model",
        )
    return cfg.lora_dir


async def training_jobs(service: Service, backend: str | None = None) -> list[JobRecord]:
    """Train jobs (queued, running and recent), oldest first, optionally of one backend."""
    jobs = await service.broker.jobs_of_task("train")
    out = [j for j in jobs if backend is None or (j.train is not None and j.train.backend == backend)]
    return sorted(out, key=lambda j: j.created_at)


async def build_train_job(service: Service, req: TrainRequest) -> JobRecord:
    """Validate ``req`` and build its job (not yet queued)."""
    ms = await service.served_model(req.model)
    lora_dir = check_trainable(ms)
    output = adapter_dir(lora_dir, req.adapter_name)
    if req.resolution * req.resolution > ms.cfg.max_pixels:
        raise BadRequest(
            f"resolution {req.resolution} is {req.resolution**2} pixels, over model {ms.name!r}'s max_pixels "
            f"of {ms.cfg.max_pixels}; choose a smaller resolution",
            param="resolution",
        )
    busy = [
        j for j in await training_jobs(service)
        if not j.status.finished and j.train is not None and j.train.output == str(output)
    ]  # fmt: skip
    if busy:
        raise Conflict(
            f"adapter {req.adapter_name!r} of model {ms.name!r} is already being trained by task {busy[0].id}; "
            "wait for it, stop it, or choose another adapter_name",
            param="adapter_name",
        )
    if has_weights(output) and not req.overwrite:
        raise Conflict(
            f"adapter {req.adapter_name!r} already exists in {lora_dir}; choose another adapter_name or send overwrite: true",
            param="adapter_name",
        )
    folder, samples = await anyio.to_thread.run_sync(validate_dataset, req.dataset_dir, service.settings.training.dataset_roots)
    if req.batch_size > len(samples):
        raise BadRequest(
            f"batch_size {req.batch_size} is larger than the dataset ({len(samples)} images); lower it",
            param="batch_size",
        )
    plan = TrainPlan(
        model=ms.name,
        backend=ms.cfg.backend,
        base_model=ms.cfg.model_path or ms.cfg.base_model_path,
        dataset=str(folder),
        samples=samples,
        adapter_name=req.adapter_name,
        output=str(output),
        steps=req.steps,
        rank=req.rank,
        alpha=req.alpha if req.alpha is not None else float(req.rank),
        learning_rate=req.learning_rate,
        batch_size=req.batch_size,
        resolution=req.resolution,
        seed=parse_seed(req.seed),
        save_every=req.save_every,
        gradient_checkpointing=req.gradient_checkpointing,
    )
    return JobRecord(
        model=ms.name,
        task="train",
        priority=parse_priority(req.priority),
        train=plan,
        total_steps=plan.steps,
        # forecast: like generating batch_size images of resolution² for `steps` steps
        features=call_features("train", plan.steps, plan.resolution**2 / 1e6, plan.batch_size).tolist(),
        extra={"adapter_name": plan.adapter_name, "seed": plan.seed, "images": len(samples)},
    )
