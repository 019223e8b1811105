"""Tiled inference for image-to-image models whose output is ``scale`` times larger.

The input is cut into ``tile``-pixel squares; each is run with ``overlap`` pixels of
real context on every side (clipped at the image border), and only the centre of
the result (the part that belongs to the tile) is kept.  The context makes seams
invisible for convolutional models whose receptive field fits in the overlap, and
memory stays bounded by one padded tile however large the image is.

Interface: ``tile_boxes(width, height, tile)`` and
``run_tiled(fn, pixels, scale, tile, overlap, progress)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

Pixels = NDArray[np.uint8]  # H x W x C
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
Progress = Callable[[int, int], None]  # (tiles done, tiles in total)


def tile_boxes(width: int, height: int, tile: int) -> list[Box]:
    """The tiles covering a ``width`` x ``height`` image, row by row; one box for
    the whole image when ``tile`` is 0 or at least the image size."""
    if tile <= 0:
        return [(0, 0, width, height)]
    return [
        (x0, y0, min(x0 + tile, width), min(y0 + tile, height)) for y0 in range(0, height, tile) for x0 in range(0, width, tile)
    ]


def run_tiled(
    fn: Callable[[Pixels], Pixels],
    pixels: Pixels,
    scale: int,
    tile: int,
    overlap: int,
    progress: Progress | None = None,
) -> Pixels:
    """``fn`` applied tile by tile; ``fn`` maps an h x w x C patch to (h*scale) x
    (w*scale) x C.  The result equals ``fn(pixels)`` when one tile covers the image."""
    height, width = pixels.shape[:2]
    boxes = tile_boxes(width, height, tile)
    if len(boxes) == 1:
        out = fn(pixels)
        if progress is not None:
            progress(1, 1)
        return out
    out = np.empty((height * scale, width * scale, pixels.shape[2]), dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes, 1):
        px0, py0 = max(x0 - overlap, 0), max(y0 - overlap, 0)
        px1, py1 = min(x1 + overlap, width), min(y1 + overlap, height)
        result = fn(pixels[py0:py1, px0:px1])
        keep_y, keep_x = (y0 - py0) * scale, (x0 - px0) * scale
        out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = result[
            keep_y : keep_y + (y1 - y0) * scale, keep_x : keep_x + (x1 - x0) * scale
        ]
        if progress is not None:
            progress(i, len(boxes))
    return out
