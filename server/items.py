"""What one pipeline call of a job asks for, defined once: the ``Item`` the job
record stores (server/jobs.py) is the same object a backend reads inside its
``WorkItem`` (server/backends/base.py), which adds only the input images decoded.

A new request field is added here (and where the request is parsed), nowhere else.
"""

from __future__ import annotations

from msgspec import Struct

from .samplers import timesteps


class Lora(Struct, frozen=True):
    name: str
    scale: float = 1.0


def run_steps(steps: int, strength: float | None, partial: bool, sampler: str | None = None) -> int:
    """The denoising steps a pipeline call really runs: img2img and inpainting
    (``partial``) start ``strength`` of the way into the schedule, so they run
    ``int(steps * strength)`` of ``steps`` (Diffusers' rule; 0 means none, a request
    the build refuses); any other call runs ``steps``.  Some samplers run more
    timesteps than steps, each a step of the call (Heun: 2n - 1; ``samplers.timesteps``).
    A family that rounds otherwise reports its own total with each step, and that
    total wins (server/worker/context.py)."""
    n = steps if not partial or strength is None else min(steps, int(steps * strength))
    return timesteps(sampler, n)


class Item(Struct, kw_only=True):
    """One pipeline call of a job: ``n`` images for one prompt; image ``k`` uses
    seed ``seed + k``.  Images are blob keys (``images``, ``init_image``, ``mask``)."""

    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    n: int = 1
    negative_prompt: str | None = None
    guidance: float | None = None
    images: list[str] = []
    init_image: str | None = None
    strength: float | None = None
    mask: str | None = None  # L PNG, 255 = repaint (server/masking.py), the size of images[0]
    mask_blur: int = 0  # feather (px) inside the mask's edge when compositing
    loras: list[Lora] = []
    scale: int | None = None  # upscale jobs: the factor
    cache: str | None = None  # "off" | "fast": the model's step cache for this job (None: the model's default)
    sampler: str | None = None  # A1111's sampler name (server/samplers.py); None: the model's own scheduler
    scheduler: str | None = None  # A1111's schedule id (karras...); None: automatic

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1_000_000

    @property
    def run_steps(self) -> int:
        """The denoising steps its pipeline call runs: ``steps`` times ``strength`` for
        img2img and masked edits (``run_steps``), else ``steps``.  The job's
        ``total_steps``, its progress, previews and forecast all count these."""
        return run_steps(self.steps, self.strength, self.init_image is not None or self.mask is not None, self.sampler)
