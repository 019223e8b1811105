"""Per-key allow-lists: the models, LoRAs, image size, steps and images a key's jobs
may use (``models``, ``loras``, ``max_pixels``, ``max_steps``, ``max_images`` on a key,
or in ``auth.quota`` for every key without its own).

A job outside them is a 403 ``not_allowed`` whose message names the limit and the
value asked, and whose ``limit`` names the setting.  ``Service.submit`` checks every
job it queues (the job API, the OpenAI shim, the A1111 API, upscales, training), on
the job as built; the listings of models (``/api/ls``, ``/api/ps``, ``/v1/models``,
A1111's ``sd-models`` and ``upscalers``) show a key only the models it may use, and
the LoRA listings (``/api/loras``, A1111's ``loras``) only the adapters it may use.

What each limit counts: ``max_pixels`` the pixels of each image a job delivers (its
width × height after any upscale: an upscale job's output); ``max_steps`` the
denoising steps of each generate or edit (not a training run's steps);
``max_images`` the images one job makes; ``loras`` the adapters a job's prompts
use; ``models`` the model a job runs on (a training job's too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import NotAllowed

if TYPE_CHECKING:
    from .auth import Caller
    from .items import Item
    from .jobs import JobRecord

DENOISING = ("generate", "edit")  # the tasks whose steps max_steps limits


def may_use(caller: Caller, model: str) -> bool:
    """Whether ``caller``'s allow-list lets its jobs run on ``model`` (listings)."""
    models = caller.quota.models
    return models is None or model in models


def may_use_lora(caller: Caller, name: str) -> bool:
    """Whether ``caller``'s allow-list lets its jobs use the LoRA ``name`` (listings)."""
    loras = caller.quota.loras
    return loras is None or name in loras


def check_model(caller: Caller, model: str) -> None:
    """403 unless ``caller`` may use ``model`` (before anything is loaded for it)."""
    if not may_use(caller, model):
        allowed = ", ".join(caller.quota.models or ()) or "none"
        raise NotAllowed(
            f"{_who(caller)} may not use model {model!r} (its models allow-list: {allowed}); name one of those",
            param="model",
            limit="models",
        )


def check(caller: Caller, job: JobRecord) -> None:
    """403 if ``job`` is outside any of ``caller``'s allow-lists."""
    quota = caller.quota
    check_model(caller, job.model)
    who = _who(caller)
    if quota.max_images is not None and job.task_length > quota.max_images:
        raise NotAllowed(
            f"{who} may make at most {quota.max_images} images per job (max_images) and this job asks for "
            f"{job.task_length}; ask for fewer (n, or fewer prompts)",
            param="n",
            limit="max_images",
        )
    for item in job.items:
        if quota.loras is not None:
            for lora in item.loras:
                if lora.name not in quota.loras:
                    allowed = ", ".join(quota.loras) or "none"
                    raise NotAllowed(
                        f"{who} may not use LoRA {lora.name!r} (its loras allow-list: {allowed}); remove it or use one of those",
                        param="loras",
                        limit="loras",
                    )
        if quota.max_steps is not None and job.task in DENOISING and item.steps > quota.max_steps:
            raise NotAllowed(
                f"{who} may use at most {quota.max_steps} steps (max_steps) and this job asks for {item.steps}; "
                f"ask for {quota.max_steps} or fewer",
                param="steps",
                limit="max_steps",
            )
        width, height = _delivered(job, item)
        if quota.max_pixels is not None and width * height > quota.max_pixels:
            raise NotAllowed(
                f"{who} may make images of at most {quota.max_pixels} pixels (max_pixels) and this job's are "
                f"{width}x{height} = {width * height}; ask for a smaller size (or a smaller upscale factor)",
                param="upscale" if job.upscale and item.width * item.height <= quota.max_pixels else "size",
                limit="max_pixels",
            )


def _delivered(job: JobRecord, item: Item) -> tuple[int, int]:
    """The size of the images ``item`` delivers: after the job's upscale (or, for an
    upscale job, its factor)."""
    factor = (item.scale or 1) if job.task == "upscale" else (job.upscale or 1)
    return item.width * factor, item.height * factor


def _who(caller: Caller) -> str:
    return f"key {caller.key_id!r}" if caller.key_id is not None else "a caller without a key"
