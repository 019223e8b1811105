"""Masks for inpainting and outpainting, in one convention: an 8-bit ``L`` image the
size of the first reference, 255 = repaint, 0 = keep.

``normalize_mask`` turns what clients send into that at submit (OpenAI's meaning:
fully transparent pixels of a mask with alpha are the area to edit; a mask without
alpha is white = edit, black = keep).  ``expand_canvas`` pads a reference for
outpainting (the mask is the new area).  ``composite`` is the one place where a
masked result is put back over its source: pixels outside the mask come back
unchanged, and the result fades in over ``blur`` pixels inside the mask's edge.

Pillow only (no torch): the API node uses it to validate, the worker to composite.
"""

from __future__ import annotations

import io
import struct

from PIL import Image, ImageFilter, UnidentifiedImageError

from .errors import BadRequest

EDIT, KEEP = 255, 0
DEFAULT_BLUR = 4  # px of feather inside the mask's edge when mask_blur is not given
MULTIPLE = 16  # sides of the pipelines' canvas


# what Pillow raises on a broken file (a corrupt PNG chunk is a SyntaxError, a short one EOFError or struct.error)
BAD_IMAGE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


def decode_mask(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Mask bytes -> the ``L`` convention (255 = edit); undecodable data is a 400."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise BadRequest(f"{param}: the mask is {img.width}x{img.height}, over the limit of {max_pixels} pixels", param=param)
        img.load()
    except BAD_IMAGE as exc:
        raise BadRequest(
            f"{param}: could not decode the mask ({type(exc).__name__}); send a PNG whose transparent pixels "
            "(or, without alpha, white pixels) mark the area to edit",
            param=param,
        ) from None
    return normalize_mask(img)


def normalize_mask(img: Image.Image) -> Image.Image:
    """Alpha: fully transparent = edit; no alpha: white (>= 128 grey) = edit."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: EDIT if a == 0 else KEEP)
    return img.convert("L").point(lambda v: EDIT if v >= 128 else KEEP)


def encode_mask(mask: Image.Image) -> bytes:
    buf = io.BytesIO()
    mask.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def is_all_keep(mask: Image.Image) -> bool:
    return mask.convert("L").getbbox() is None  # no pixel above 0: nothing to repaint


def canvas_size(width: int, height: int) -> tuple[int, int]:
    """The pipeline's size for a source of ``width x height``: the nearest multiples of 16."""
    return max(MULTIPLE, round(width / MULTIPLE) * MULTIPLE), max(MULTIPLE, round(height / MULTIPLE) * MULTIPLE)


def expand_canvas(
    image: Image.Image, left: int, right: int, top: int, bottom: int, mask: Image.Image | None = None
) -> tuple[Image.Image, Image.Image]:
    """``image`` padded by the given pixels, the new area pre-filled with a blurred
    stretch of the image (a better start than grey); and the mask: the new area,
    plus ``mask`` (if any) over the original area."""
    w, h = image.size
    size = (w + left + right, h + top + bottom)
    source = image.convert("RGB")
    canvas = source.resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(max(4, min(size) // 16)))
    canvas.paste(source, (left, top))
    out = Image.new("L", size, EDIT)
    out.paste(mask if mask is not None else Image.new("L", (w, h), KEEP), (left, top))
    return canvas, out


def erode(mask: Image.Image, px: int) -> Image.Image:
    """255 only where every pixel within ``px`` (a square) is 255."""
    if px <= 0:
        return mask
    return mask.filter(ImageFilter.BoxBlur(px)).point(lambda v: EDIT if v == EDIT else KEEP)


def feather(mask: Image.Image, blur: int) -> Image.Image:
    """The compositing alpha: the mask eroded by ``blur`` px, then blurred back out by
    ``blur`` px, so it is 0 everywhere outside the mask and ramps up inside its edge."""
    if blur <= 0:
        return mask
    half = blur // 2
    alpha = erode(mask, blur)
    if half:
        alpha = alpha.filter(ImageFilter.BoxBlur(half))
    return alpha.filter(ImageFilter.BoxBlur(blur - half))


def composite(result: Image.Image, source: Image.Image, mask: Image.Image, blur: int) -> Image.Image:
    """``result`` (resized to the source's size when the pipeline ran at another) over
    ``source`` through the feathered mask: the source's pixels outside the mask."""
    source = source.convert("RGB")
    if result.size != source.size:
        result = result.resize(source.size, Image.Resampling.LANCZOS)
    if mask.size != source.size:  # never after build_job's checks; kept safe
        mask = mask.resize(source.size, Image.Resampling.NEAREST)
    return Image.composite(result.convert("RGB"), source, feather(mask.convert("L"), blur))
