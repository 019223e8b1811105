"""A job's pipeline calls, on the model's thread: the stored record becomes the
backend's work items (its input blobs decoded), each call is timed for the forecast,
a masked edit's result is composited over its original, and a training job runs
the trainer where the model lives."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..backends.base import Backend, BackendError, WorkItem, failure_message
from ..build import decode_image
from ..items import Item
from ..jobs import JobRecord, image_tokens
from ..masking import composite
from .process import ModelProcess

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..training.plan import TrainPlan
    from .context import JobContext

log = logging.getLogger("easel")


class Inputs:
    """A job's input images, decoded once each on first use."""

    def __init__(self, blobs: dict[str, bytes], max_pixels: int) -> None:
        self.blobs = blobs
        self.max_pixels = max_pixels
        self._decoded: dict[str, Image] = {}

    def image(self, key: str, param: str) -> Image:
        if key not in self._decoded:
            data = self.blobs.get(key)
            if data is None:
                raise BackendError(f"{param}: the job's input image is no longer stored (it expired); submit the job again")
            self._decoded[key] = decode_image(data, param, self.max_pixels)
        return self._decoded[key]


def work_item(task: str, item: Item, inputs: Inputs) -> WorkItem:
    """The backend's view of one pipeline call of a stored job: the stored item
    itself, its blob keys decoded to images."""
    return WorkItem(
        task=task,  # type: ignore[arg-type]
        spec=item,
        images=[inputs.image(k, f"images[{i}]") for i, k in enumerate(item.images)],
        init_image=inputs.image(item.init_image, "init_image") if item.init_image else None,
        mask=inputs.image(item.mask, "mask").convert("L") if item.mask else None,
    )


def execute(backend: Backend, job: JobRecord, ctx: JobContext, blobs: dict[str, bytes], max_pixels: int) -> tuple[list[Image], list[float]]:
    """Run every pipeline call of ``job`` (the model's thread): the images, and the
    seconds of each call."""
    if job.task == "train":
        assert job.train is not None
        ctx.begin_call(job.total_steps)  # the trainer reports its steps of the plan's total
        trained = train(backend, job.train, ctx)
        ctx.end_call()
        return trained, []
    inputs = Inputs(blobs, max_pixels)
    images: list[Image] = []
    seconds: list[float] = []
    text_tokens = ref_tokens = 0
    warnings: list[str] = []
    for n, item in enumerate(job.items):
        work = work_item(job.task, item, inputs)
        tokens, limit = prompt_tokens(backend, job, item.prompt)
        text_tokens += tokens
        if limit is not None and tokens > limit:
            which = "the prompt" if len(job.items) == 1 else f"prompt {n + 1}"
            warnings.append(
                f"{which} is {tokens} tokens but the text encoder of model {job.model!r} takes {limit}: "
                f"the last {tokens - limit} tokens were cut; shorten the prompt"
            )
        refs = [*work.images, *([work.init_image] if work.init_image is not None else [])]
        ref_tokens += sum(image_tokens(im.width, im.height) for im in refs)
        if n == len(job.items) - 1:
            job.text_tokens, job.image_tokens, job.warnings = text_tokens, ref_tokens, warnings
            if warnings:  # shown by the status while the job runs (the finish stores them too)
                ctx.publish({"warnings": list(warnings)})
        times = ctx.begin_call(item.run_steps)
        out = backend.run(work, ctx)
        if work.mask is not None and work.images:  # outside the mask, the original pixels
            out = [composite(im, work.images[0], work.mask, item.mask_blur) for im in out]
        images.extend(out)
        ctx.end_call()
        seconds.append((times.end or times.start) - times.start)
    return images, seconds


def train(backend: Backend, plan: TrainPlan, ctx: JobContext) -> list[Image]:
    """A LoRA-training job: in the model's own process where it lives there."""
    if isinstance(backend, ModelProcess):
        return backend.train(plan, ctx)
    from ..training.lora_trainer import LoraTrainer  # imports torch

    return LoraTrainer(plan).run(backend, ctx)


def prompt_tokens(backend: Backend, job: JobRecord, prompt: str) -> tuple[int, int | None]:
    """(tokens, limit) from the model's tokenizer; words when it cannot say."""
    try:
        return backend.count_tokens(prompt)
    except Exception as exc:  # counting must never fail a job
        log.warning("job %s: could not count the prompt's tokens (%s); counting words", job.id, failure_message(exc))
        return len(prompt.split()), None
