"""Placeholder backend: the prompt drawn on a seeded gradient.

It needs no GPU and no weights.  ``simulate_step_seconds`` (seconds per denoising
step at one megapixel, per image; edits cost 25% more per reference image) makes
it behave like a real model for queueing, progress, cancel and forecasts;
``simulate_call_step_seconds`` adds seconds per step of a pipeline call however
many images it makes (what a batch of jobs shares, as a GPU's fixed cost per step);
``simulate_first_call_seconds`` makes the first job after a load that much slower,
as a real pipeline's set-up makes it.

``simulate_peak_mib`` is what a job holds beyond ``simulate_size_mib`` at its peak
(after the first job, residency budgets count both).  An img2img call runs
``Item.run_steps`` of its steps, as a Diffusers pipeline does.

For tests only, with ``simulate_faults: true`` (never in a shipped config): the
prompt ``fail`` fails the job; ``hang`` (or ``hang N``: N seconds) blocks without
reporting a step, until the job is cancelled or for at most ``MAX_HANG`` seconds (in
an isolated model's process, until the process is killed); ``stuck N`` blocks N
seconds (at most ``MAX_HANG``) blind to cancellation, as a call hung in a kernel or
in I/O is; ``device fault`` raises the error a broken CUDA context gives (an illegal
memory access).
"""

from __future__ import annotations

import functools
import textwrap
import threading
import time
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .base import BackendError, Capabilities, JobCancelled, StepContext, WorkItem, count_words, model_capabilities, preview_size

if TYPE_CHECKING:
    from ..config import ModelConfig, Settings

REF_COST = 0.25  # a reference's pixels cost this fraction of the output's per step
MIN_TEXT_WIDTH, MIN_TEXT_HEIGHT = 48, 32  # smaller images get no caption: no line of it would show
MAX_HANG = 600.0  # seconds the prompt 'hang' blocks at most
HANG_POLL = 0.05  # how often a hang looks whether its job was cancelled
_RAMP = Image.linear_gradient("L")


@functools.lru_cache(maxsize=8)
def _ramp(width: int, height: int) -> Image.Image:
    """The gradient's mask at one size (1-pixel-high ramp resized; read-only)."""
    return _RAMP.resize((width, height), Image.Resampling.NEAREST)


@functools.lru_cache(maxsize=16)
def _font(width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bitmap font for small images (7x cheaper), its scalable one for large."""
    if width < 256:
        return ImageFont.load_default_imagefont()
    return ImageFont.load_default(size=max(12, width // 32))


class StubBackend:
    isolated = False

    def __init__(self, name: str, cfg: ModelConfig, settings: Settings) -> None:
        self.name = name
        self.cfg = cfg
        self.capabilities: Capabilities = model_capabilities(cfg)
        self._sleeper = threading.Event()  # never set: an interruptible sleep
        self.loaded = False
        self.warm = False  # has run a job since its load

    def load(self) -> None:
        if self.cfg.simulate_load_seconds > 0:  # a real model's load takes time (residency tests)
            self._sleeper.wait(self.cfg.simulate_load_seconds)
        self.loaded = True
        self.warm = False

    def unload(self) -> None:
        self.loaded = False

    def cost_prior(self, fit: str) -> dict[str, float] | None:
        s = self.cfg.simulate_step_seconds
        return {"job": 0.002, "step": self.cfg.simulate_call_step_seconds, "step_mp": s, "step_reference_mp": s * REF_COST}

    def count_tokens(self, prompt: str) -> tuple[int, int | None]:
        return count_words(prompt)  # no tokenizer: words

    def after_job(self, release_cache: bool) -> float | None:
        if self.cfg.simulate_size_mib is None:
            return None
        return self.cfg.simulate_size_mib + self.cfg.simulate_peak_mib

    def step_seconds(self, item: WorkItem) -> float:
        refs = sum(im.width * im.height for im in item.images) / 1_000_000
        return self.cfg.simulate_step_seconds * item.spec.n * (item.spec.megapixels + REF_COST * refs)

    def run(self, item: WorkItem, ctx: StepContext) -> list[Image.Image]:
        if self.cfg.simulate_faults:
            self._misbehave(item, ctx)
        if not self.warm and self.cfg.simulate_first_call_seconds > 0:  # set-up before the first step
            self._sleeper.wait(self.cfg.simulate_first_call_seconds)
        self.warm = True
        per_step = self.cfg.simulate_call_step_seconds + self.step_seconds(item)
        steps = item.run_steps
        for i in range(1, steps + 1):
            if per_step > 0:
                self._sleeper.wait(per_step)
            ctx.step(i, steps)
            if ctx.wants_preview(i):  # drawn at preview size: cheap
                ctx.preview(self._draw(item, item.spec.seed, preview_size(item.spec.width, item.spec.height), blur_to=i / steps))
        return [self._draw(item, item.spec.seed + k) for k in range(item.spec.n)]

    def run_batch(self, items: list[WorkItem], ctx: StepContext) -> list[list[Image.Image]]:
        """Several compatible items in one simulated call: each step costs what the
        items' steps cost together; ``ctx`` a ``BatchSteps`` (one preview per item)."""
        if self.cfg.simulate_faults:
            for item in items:
                self._misbehave(item, ctx)
        if not self.warm and self.cfg.simulate_first_call_seconds > 0:
            self._sleeper.wait(self.cfg.simulate_first_call_seconds)
        self.warm = True
        per_step = self.cfg.simulate_call_step_seconds + sum(self.step_seconds(item) for item in items)
        steps = items[0].run_steps
        for i in range(1, steps + 1):
            if per_step > 0:
                self._sleeper.wait(per_step)
            ctx.step(i, steps)
            if ctx.wants_preview(i):
                ctx.preview([self._draw(it, it.spec.seed, preview_size(it.spec.width, it.spec.height), blur_to=i / steps) for it in items])  # type: ignore[arg-type]
        return [[self._draw(item, item.spec.seed + k) for k in range(item.spec.n)] for item in items]

    def _misbehave(self, item: WorkItem, ctx: StepContext) -> None:
        """The test prompts (``simulate_faults``; see the module doc)."""
        prompt = item.spec.prompt.strip().lower()
        if prompt == "fail":
            raise BackendError("the stub backend was asked to fail (prompt 'fail')")
        if prompt == "device fault":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated by the stub)")
        if (hang := _hang_seconds(item.spec.prompt, "hang")) is not None:
            self._hang(hang, ctx)
        if (stuck := _hang_seconds(item.spec.prompt, "stuck")) is not None:
            self._sleeper.wait(stuck)  # cancelling the job does not end it

    def _hang(self, seconds: float, ctx: StepContext) -> None:
        """Block without reporting a step: a hung pipeline call, for tests."""
        deadline = time.monotonic() + seconds
        while not ctx.cancelled and (left := deadline - time.monotonic()) > 0:
            self._sleeper.wait(min(left, HANG_POLL))
        if ctx.cancelled:
            raise JobCancelled()

    def _draw(self, item: WorkItem, seed: int, size: tuple[int, int] | None = None, blur_to: float = 1.0) -> Image.Image:
        """The image of ``item`` for ``seed``, at ``size`` (a preview's) or the item's."""
        c1, c2 = _colours(seed)
        w, h = size or (item.spec.width, item.spec.height)
        # a diagonal gradient: c1 pasted over c2 through the ramp as a mask
        img = Image.new("RGB", (w, h), c2)
        img.paste(c1, (0, 0, w, h), _ramp(w, h))
        if item.images:
            img = Image.blend(img, ImageOps.fit(item.images[0].convert("RGB"), (w, h)), 0.5)
        if w >= MIN_TEXT_WIDTH and h >= MIN_TEXT_HEIGHT:
            self._caption(img, item.spec.prompt, seed)
        if blur_to < 1.0:
            img = img.reduce(max(1, int(8 * (1 - blur_to)) or 1)).resize((w, h))
        return img

    @staticmethod
    def _caption(img: Image.Image, prompt: str, seed: int) -> None:
        w = img.width
        draw = ImageDraw.Draw(img)
        font = _font(w)
        size = getattr(font, "size", 11)
        text = "\n".join(textwrap.wrap(prompt, width=max(8, int(w / (0.6 * size)) - 2))[:8]) + f"\nseed {seed}"
        try:
            draw.multiline_text((8, 8), text, fill=(255, 255, 255), font=font)
        except UnicodeEncodeError:  # Pillow's built-in bitmap font draws Latin-1 only
            draw.multiline_text((8, 8), text.encode("latin-1", "replace").decode("latin-1"), fill=(255, 255, 255), font=font)


def _hang_seconds(prompt: str, word: str) -> float | None:
    """Seconds the prompt ``word`` / ``word N`` (``hang``, ``stuck``) asks to block;
    None for any other prompt."""
    words = prompt.strip().lower().split()
    if not words or words[0] != word or len(words) > 2:
        return None
    try:
        return min(float(words[1]), MAX_HANG) if len(words) == 2 else MAX_HANG
    except ValueError:
        return None


def _colours(seed: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The gradient's two colours, from the seed (a multiplicative hash: seeding a
    Mersenne Twister per image costs more than the rest of a thumbnail)."""
    x = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFF  # 48 bits: two colours
    x ^= x >> 29
    return (x & 255, (x >> 8) & 255, (x >> 16) & 255), ((x >> 24) & 255, (x >> 32) & 255, (x >> 40) & 255)
