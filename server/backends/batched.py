"""A batched pipeline call of a Diffusers backend: several compatible items (one
call but for their prompts, negative prompts and seeds: ``jobs.batch_key``) in one
call, one row per image, image k of an item drawn from its seed + k as alone; each
item's images come back separately.  ``DiffusersBackend.run_batch`` calls it and makes
its out-of-memory failures sentences.

``ctx`` is a ``BatchSteps`` (or, in a model's own process, its proxy): each step
goes to every item's job, and ``ctx.preview`` gets one image per item (the latents
of its first row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import BackendError, StepContext, WorkItem
from .lora import applied_loras
from .sampling import scheduler_for
from .speed import use_step_cache

if TYPE_CHECKING:
    from PIL.Image import Image

    from .diffusers_common import DiffusersBackend


def run_batch(backend: DiffusersBackend, items: list[WorkItem], ctx: StepContext) -> list[list[Image]]:
    first = items[0]
    if len(items) == 1:
        return [backend.run(first, ctx)]
    if backend.pipe is None:
        raise BackendError(f"model {backend.name!r} is not loaded; load it first")
    check_compatible(backend, items)
    backend.prompt_cache.scope = tuple((lora.name, lora.scale) for lora in first.spec.loras)  # adapters may change the encoder
    pipe, kwargs = backend._call_kwargs(first)
    kwargs = backend._rows_kwargs(kwargs, [it.spec.negative_prompt for it in items for _ in range(it.spec.n)])
    kwargs.update(
        prompt=[it.spec.prompt for it in items for _ in range(it.spec.n)],
        num_inference_steps=first.spec.steps,
        callback_on_step_end_tensor_inputs=["latents"],
        output_type="pil",
    )
    generators = [g for it in items for g in backend.generators(it)]
    rows = [sum(it.spec.n for it in items[:k]) for k in range(len(items))]  # each item's first row
    previews = [backend._preview(it) for it in items]

    def callback(pipe: Any, i: int, _t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        ctx.step(i + 1, int(pipe._num_timesteps))
        if ctx.wants_preview(i + 1) and "latents" in kw:
            with torch.no_grad():
                shown = [p(pipe, kw["latents"][r : r + 1]) for p, r in zip(previews, rows, strict=True)]
            if all(im is not None for im in shown):
                ctx.preview(shown)  # type: ignore[arg-type]  # a BatchSteps: one image per item
        return kw

    use_step_cache(backend.pipe, backend.cfg, first.spec.cache)
    with (applied_loras(backend.pipe, first.spec.loras, backend.cfg.lora_dir, backend.name, backend.cfg.lora_cache_size, backend.cfg.compile == "regional"),
          scheduler_for(pipe, backend.cfg.backend, first.spec.sampler, first.spec.scheduler)):  # fmt: skip
        out = pipe(generator=generators, num_images_per_prompt=1, callback_on_step_end=callback, **kwargs)
    return [out.images[r : r + it.spec.n] for it, r in zip(items, rows, strict=True)]


def check_compatible(backend: DiffusersBackend, items: list[WorkItem]) -> None:
    """Only generates of one size, steps, guidance, sampler, schedule, LoRA set and step cache share a call."""
    first = items[0]
    call = (first.spec.width, first.spec.height, first.spec.steps, first.spec.guidance, first.spec.sampler, first.spec.scheduler, first.spec.loras, first.spec.negative_prompt is None, first.spec.cache)
    for it in items:
        same = (it.spec.width, it.spec.height, it.spec.steps, it.spec.guidance, it.spec.sampler, it.spec.scheduler, it.spec.loras, it.spec.negative_prompt is None, it.spec.cache) == call
        if not same or it.task != "generate" or it.images or it.init_image is not None or it.mask is not None or not backend._batchable(it):
            raise BackendError(f"model {backend.name!r}: these jobs cannot share a pipeline call; they run one by one")
