"""Placeholder backend: the prompt drawn on a seeded gradient.

It needs no GPU and no weights.  ``simulate_step_seconds`` (seconds per denoising
step at one megapixel, per image; edits cost 25% more per reference image) makes
it behave like a real model for queueing, progress, cancel and forecasts.
"""

from __future__ import annotations

import functools
import random
import textwrap
import threading
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .base import BackendError, Capabilities, StepContext, WorkItem, model_capabilities

if TYPE_CHECKING:
    from ..config import ModelConfig, Settings

REF_COST = 0.25  # extra cost per reference image, as a fraction
_RAMP = Image.linear_gradient("L")


@functools.lru_cache(maxsize=16)
def _font(width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bitmap font for small images (7x cheaper), its scalable one for large."""
    if width < 256:
        return ImageFont.load_default_imagefont()
    return ImageFont.load_default(size=max(12, width // 32))


class StubBackend:
    def __init__(self, name: str, cfg: ModelConfig, settings: Settings) -> None:
        self.name = name
        self.cfg = cfg
        self.capabilities: Capabilities = model_capabilities(cfg, ("generate", "edit"))
        self._sleeper = threading.Event()  # never set: an interruptible sleep
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def cost_prior(self, task: str) -> list[float] | None:
        s = self.cfg.simulate_step_seconds
        return [0.002, s, 0.0, s * REF_COST]

    def step_seconds(self, item: WorkItem) -> float:
        return self.cfg.simulate_step_seconds * item.megapixels * item.n * (1 + REF_COST * len(item.images))

    def run(self, item: WorkItem, ctx: StepContext) -> list[Image.Image]:
        if item.prompt.strip().lower() == "fail":  # lets tests exercise a failing job
            raise BackendError("the stub backend was asked to fail (prompt 'fail')")
        per_step = self.step_seconds(item)
        for i in range(1, item.steps + 1):
            if per_step > 0:
                self._sleeper.wait(per_step)
            ctx.step(i, item.steps)
            if ctx.wants_preview(i):
                ctx.preview(self._draw(item, item.seed, blur_to=i / item.steps))
        return [self._draw(item, item.seed + k) for k in range(item.n)]

    def _draw(self, item: WorkItem, seed: int, blur_to: float = 1.0) -> Image.Image:
        rng = random.Random(seed)
        c1 = tuple(rng.randrange(256) for _ in range(3))
        c2 = tuple(rng.randrange(256) for _ in range(3))
        w, h = item.width, item.height
        # a diagonal gradient: 1-pixel-high ramp resized, cheap even at 4 MP
        ramp = _RAMP.resize((w, h), Image.Resampling.NEAREST)
        if item.images:
            base = ImageOps.fit(item.images[0].convert("RGB"), (w, h))
            img = Image.blend(Image.composite(Image.new("RGB", (w, h), c1), Image.new("RGB", (w, h), c2), ramp), base, 0.5)
        else:
            img = Image.composite(Image.new("RGB", (w, h), c1), Image.new("RGB", (w, h), c2), ramp)
        draw = ImageDraw.Draw(img)
        font = _font(w)
        size = getattr(font, "size", 11)
        text = "\n".join(textwrap.wrap(item.prompt, width=max(8, int(w / (0.6 * size)) - 2))[:8])
        draw.multiline_text((8, 8), f"{text}\nseed {seed}", fill=(255, 255, 255), font=font)
        if blur_to < 1.0:
            img = img.reduce(max(1, int(8 * (1 - blur_to)) or 1)).resize((w, h))
        return img
