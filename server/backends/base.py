"""The contract between the worker loop and a model backend.

The worker knows nothing about Diffusers: it hands a backend one ``WorkItem`` at a
time together with a ``StepContext`` and gets PIL images back.  Backends report
progress (and honour cancellation) through ``ctx.step``; they raise
``BackendError`` with a sentence a user can act on when a request cannot be served.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from ..families import FAMILIES
from ..items import Item, run_steps

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..config import ModelConfig

Task = Literal["generate", "edit", "train", "upscale"]


def free_memory() -> None:
    """Collect garbage and empty torch's CUDA / MPS caches (without importing torch
    where no backend has: a stub-only server never loads it)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.empty_cache()


PREVIEW_SIDE = 256  # previews (live and partial images) are at most this many pixels a side


def preview_size(width: int, height: int) -> tuple[int, int]:
    """The size of a preview of a width x height image: the same aspect, the longest
    side at most ``PREVIEW_SIDE``."""
    scale = min(1.0, PREVIEW_SIDE / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


class JobCancelled(Exception):
    """Raised inside a backend (by ``StepContext.step``) when the job was cancelled."""


class BackendError(Exception):
    """A failure the user can act on (bad LoRA, out of memory, image too small...).

    The message goes to the client verbatim, so it must be a sentence, not a
    traceback.
    """


def failure_message(exc: BaseException) -> str:
    """A sentence for the client; tracebacks stay in the log."""
    if isinstance(exc, BackendError):
        return str(exc)
    name = type(exc).__name__
    if host_out_of_memory(exc):
        return "the server ran out of host memory (RAM) for this job; try a smaller size, fewer images or reference images"
    if device_out_of_memory(exc):
        return (
            "the GPU ran out of memory for this job; try a smaller size, fewer images or "
            "reference images, or set offload to 'model' for this model"
        )
    return f"the model failed on this job ({name}: {str(exc)[:300]}); the server log has the details"


def device_fault(exc: BaseException) -> bool:
    """A device error that is not out-of-memory (an illegal address, a device-side
    assert, a failed launch): CUDA's context is then broken for good, so every later
    job of the process would fail too; the process must end (``isolate``) or the
    server restart."""
    if device_out_of_memory(exc):
        return False
    text = str(exc)
    return type(exc).__name__ == "AcceleratorError" or any(mark in text for mark in DEVICE_FAULT_MARKS)


DEVICE_FAULT_MARKS = (
    "CUDA error",  # torch's RuntimeError for any CUDA runtime error (illegal memory access, launch failure...)
    "device-side assert",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "cudaErrorIllegalAddress",
    "unspecified launch failure",
)


def out_of_memory(exc: BaseException) -> bool:
    """The device (or, on the CPU, the host) refused an allocation."""
    return device_out_of_memory(exc) or host_out_of_memory(exc)


def device_out_of_memory(exc: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is the same class),
    or another library's "out of memory" error."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def host_out_of_memory(exc: BaseException) -> bool:
    """An allocation of host memory refused: Python's ``MemoryError``, or torch's CPU
    allocator ("DefaultCPUAllocator: can't allocate memory")."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "cannot allocate memory" in text


@dataclass
class WorkItem:
    """One pipeline call as a backend sees it: the stored ``spec`` (``items.Item``:
    prompt, size, steps, seed, ``n``, LoRAs...; image ``k`` uses seed ``spec.seed + k``)
    and its input images decoded (``spec`` holds them as blob keys)."""

    task: Task
    spec: Item
    images: list[Image] = field(default_factory=list)  # edit references (spec.images decoded)
    init_image: Image | None = None  # img2img source
    mask: Image | None = None  # L, 255 = repaint, the size of images[0]; the worker composites the result

    @property
    def run_steps(self) -> int:
        """The steps the call runs (``items.run_steps``): fewer than ``spec.steps`` for img2img."""
        spec = self.spec
        return run_steps(spec.steps, spec.strength, self.init_image is not None or self.mask is not None, spec.sampler)


class StepContext(Protocol):
    """What a backend may call while it runs an item."""

    @property
    def cancelled(self) -> bool: ...

    def step(self, i: int, total: int, at: float | None = None) -> None:
        """Report that denoising step ``i`` (1-based) of ``total`` finished (``at``:
        when, in ``time.monotonic()``, if not now).

        Raises ``JobCancelled`` when the job has been cancelled, so calling it from
        Diffusers' ``callback_on_step_end`` stops the pipeline at the next step.
        """

    def wants_preview(self, i: int) -> bool:
        """True when the caller asked for a partial image after step ``i``."""

    def preview(self, image: Image, i: int | None = None) -> None:
        """Hand over the preview asked for (after step ``i``; by default the step of the
        last ``wants_preview``): a cheap projection of the intermediate latents (never
        a VAE decode), at most ``preview_size`` of the output."""


class BatchSteps:
    """The one ``StepContext`` of a batched pipeline call (``run_batch``), over the
    contexts of its items (one job each): every step goes to every item still in the
    call; an item whose context raises ``JobCancelled`` is dropped (its images are
    discarded when the call returns: ``dropped``) while the others go on, and only
    when every item is dropped does the call stop.  ``preview`` takes one image per
    item (its first row's latents), or one image for all."""

    def __init__(self, ctxs: list[StepContext]) -> None:
        self.ctxs = ctxs
        self.dropped = [False] * len(ctxs)

    @property
    def cancelled(self) -> bool:
        return all(d or c.cancelled for d, c in zip(self.dropped, self.ctxs, strict=True))

    def step(self, i: int, total: int, at: float | None = None) -> None:
        for k, ctx in enumerate(self.ctxs):
            if not self.dropped[k]:
                try:
                    ctx.step(i, total, at)
                except JobCancelled:
                    self.dropped[k] = True
        if all(self.dropped):
            raise JobCancelled()

    def wants_preview(self, i: int) -> bool:
        return any([not d and c.wants_preview(i) for d, c in zip(self.dropped, self.ctxs, strict=True)])  # asks every item

    def preview(self, image: Image | list[Image], i: int | None = None) -> None:
        images = image if isinstance(image, list) else [image] * len(self.ctxs)
        for k, ctx in enumerate(self.ctxs):
            if not self.dropped[k]:  # an item that asked for none ignores it
                ctx.preview(images[k], i)


def batches(backend: object) -> bool:
    """Whether ``backend`` can run several compatible items in one pipeline call."""
    return callable(getattr(backend, "run_batch", None))


@dataclass(frozen=True)
class Capabilities:
    tasks: tuple[str, ...] = ("generate",)
    max_images: int = 0  # reference images accepted by edits
    max_output_images: int = 4
    supports_mask: bool = False
    supports_lora: bool = False
    supports_init_image: bool = False
    supports_training: bool = False


@runtime_checkable
class Backend(Protocol):
    """A loaded (or loadable) model: what the worker needs of it.  The worker's model
    host (server/worker/host.py) makes at most one call into a backend at a time, off
    the event loop: ``run`` never runs on two threads at once."""

    capabilities: Capabilities
    isolated: bool  # the model lives in its own process (server/worker/process.py)

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def run(self, item: WorkItem, ctx: StepContext) -> list[Image]: ...

    def cost_prior(self, fit: str) -> dict[str, float] | None:
        """Prior forecast seconds per term (``forecast.TERMS``) for ``fit`` (image,
        train or upscale), or None to use the configured/default prior."""

    def count_tokens(self, prompt: str) -> tuple[int, int | None]:
        """(tokens of ``prompt`` as the text encoder sees it, the most it takes or None)."""

    def after_job(self, release_cache: bool) -> float | None:
        """A job has ended: give the allocator's cached blocks back to the device when
        ``release_cache`` (another model shares it), and say what the model holds at
        its peak, in MiB (weights, the job's activations and cached blocks, the
        process's device context; None when it cannot be measured): residency
        budgets count that, not only the weights."""


def count_words(prompt: str) -> tuple[int, int | None]:
    """The default token count of a backend without a tokenizer: the prompt's words, no limit."""
    return len(prompt.split()), None


def model_capabilities(cfg: ModelConfig) -> Capabilities:
    """Capabilities from the model config, falling back to its family's (server/families.py)."""
    family = FAMILIES[cfg.backend]
    tasks = tuple(cfg.tasks) if cfg.tasks else family.tasks
    trains = family.trainable is not None and bool(cfg.lora_dir)
    return Capabilities(
        tasks=(*tasks, "train") if trains and "train" not in tasks else tasks,
        max_images=cfg.max_images if "edit" in tasks else 0,
        max_output_images=cfg.max_output_images,
        supports_mask="edit" in tasks and family.inpaint,
        supports_lora=bool(cfg.lora_dir),
        supports_init_image="edit" in tasks,
        supports_training=trains,
    )
