"""The input images of a Diffusers call: each reference checked (big enough, RGB),
an img2img source fitted to the call's size with its strength, and an inpaint's image
and mask resized to it.  A strength that leaves no denoising step is refused with the
steps that would do.  No torch here: training's dataset fits its images with
``fit_image`` too."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, ImageOps

from .base import BackendError, WorkItem

MIN_REFERENCE_SIDE = 64


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """An RGB copy of ``image`` center-cropped and resized to exactly width x height."""
    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)


def check_references(images: list[Image.Image]) -> list[Image.Image]:
    for k, img in enumerate(images):
        if min(img.size) < MIN_REFERENCE_SIDE:
            raise BackendError(
                f"reference image {k + 1} is {img.width}x{img.height}; each side must be at least "
                f"{MIN_REFERENCE_SIDE} px — upload a larger image"
            )
    return [img.convert("RGB") for img in images]


def check_strength(strength: float, steps: int) -> None:
    """Refuse a ``strength`` that leaves none of ``steps`` to run (img2img runs steps x strength)."""
    if int(steps * strength) < 1:
        raise BackendError(
            f"strength {strength:g} with {steps} steps leaves no denoising step; "
            f"use at least {math.ceil(1 / max(strength, 1e-3))} steps or a higher strength"
        )


def img2img_inputs(item: WorkItem, strength: float) -> dict[str, Any] | None:
    """``image`` and ``strength`` for an img2img call when ``item`` has a source
    (``init_image``, else an edit's first reference), else None."""
    source = item.init_image or (item.images[0] if item.images else None)
    if source is None:
        if item.task == "edit":
            raise BackendError("an edit needs a reference image")
        return None
    check_references([source])
    check_strength(strength, item.spec.steps)
    return {"image": fit_image(source, item.spec.width, item.spec.height), "strength": strength}


def inpaint_inputs(item: WorkItem) -> dict[str, Any]:
    """``image``, ``mask_image`` and ``strength`` (default 1: the masked area is
    repainted) for an inpaint pipeline, both resized to the call's size (images[0]'s
    rounded to multiples of 16).  The worker composites the result over images[0]."""
    if not item.images or item.mask is None:
        raise BackendError("a masked edit needs a reference image and a mask")
    source = check_references(item.images[:1])[0]
    strength = item.spec.strength if item.spec.strength is not None else 1.0
    check_strength(strength, item.spec.steps)
    size = (item.spec.width, item.spec.height)
    return {
        "image": source.resize(size, Image.Resampling.LANCZOS),
        "mask_image": item.mask.convert("L").resize(size, Image.Resampling.NEAREST),
        "strength": strength,
    }
