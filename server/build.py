"""Requests -> job records: validate a decoded request against the model it names
and build the pipeline calls.  Every refusal is a ``BadRequest`` naming the field
and what to send instead.

Images are decoded here, once, to check them (``decode_off_loop``: a large one on a
worker thread, so that the event loop answers other requests meanwhile); the record
keeps only blob keys, and the bytes go to the broker with the job (``Inputs``).  The
worker decodes them again with ``decode_image``."""

from __future__ import annotations

import base64
import binascii
import io
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio.to_thread
from PIL import Image

from .backends.base import BackendError
from .backends.lora import resolve_lora
from .errors import BadRequest
from .families import default_steps, family
from .items import Item, Lora, run_steps
from .jobs import JobRecord, batch_key, input_key, new_id
from .masking import BAD_IMAGE, DEFAULT_BLUR, canvas_size, decode_mask, encode_mask, encode_png, expand_canvas, is_all_keep
from .model_checks import cache_problem
from .samplers import Unsupported, choose
from .schemas import Expand, GenerateRequest, ImageRef

if TYPE_CHECKING:
    from .config import Settings
    from .registry import ModelState

FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "JPG": "JPEG", "WEBP": "WEBP"}
MAX_SEED = 2**63 - 1
UrlFetcher = Callable[[str, str], Awaitable[bytes]]  # (url, field) -> bytes


def parse_format(value: str, param: str = "format") -> str:
    fmt = FORMATS.get(value.strip().upper())
    if fmt is None:
        raise BadRequest(f"{param} {value!r} is not supported; use PNG, JPEG or WEBP", param=param)
    return fmt


def parse_priority(value: bool | int) -> int:
    if isinstance(value, bool):
        return -1 if value else 0
    return value


def parse_seed(value: int | str | None) -> int:
    if value is None or value == "":
        return random.randrange(0, 2**32)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise BadRequest(f"seed {value!r} is not an integer; send a number such as 42", param="seed") from None
    if not 0 <= value <= MAX_SEED:
        raise BadRequest(f"seed must be between 0 and {MAX_SEED}", param="seed")
    return value


OFF_LOOP_PIXELS = 512 * 512  # a larger image is decoded on a worker thread (``decode_off_loop``)


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    return _decoded(_opened(data, param, max_pixels), param)


async def decode_off_loop(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """``decode_image``, for an image over ``OFF_LOOP_PIXELS`` on a worker thread: a
    1024x1024 PNG takes ~25 ms to decode, a 2048x2048 one ~90 ms, and Pillow lets go
    of the GIL meanwhile, so the event loop goes on with other requests instead of
    waiting.  A smaller one is decoded at once: the hand-over to a thread costs more
    (~0.5 ms of CPU) than it saves."""
    img = _opened(data, param, max_pixels)
    if img.width * img.height <= OFF_LOOP_PIXELS:
        return _decoded(img, param)
    return await anyio.to_thread.run_sync(_decoded, img, param)


def _opened(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """The image's header read and its size checked (its pixels not decoded yet)."""
    try:
        img = Image.open(io.BytesIO(data))
    except BAD_IMAGE as exc:
        raise _undecodable(param, exc) from None
    if img.width * img.height > max_pixels:
        raise BadRequest(
            f"{param}: the image is {img.width}x{img.height}, over the limit of {max_pixels} pixels; send a smaller image",
            param=param,
        )
    return img


def _decoded(img: Image.Image, param: str) -> Image.Image:
    try:
        img.load()
    except BAD_IMAGE as exc:
        raise _undecodable(param, exc) from None
    return img.convert("RGBA") if img.mode in ("RGBA", "LA", "P") and "transparency" in img.info else img.convert("RGB")


def _undecodable(param: str, exc: Exception) -> BadRequest:
    return BadRequest(
        f"{param}: could not decode the image data ({type(exc).__name__}); send PNG, JPEG or WEBP bytes as a data URL or base64",
        param=param,
    )


def decode_b64(text: str, param: str) -> bytes:
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise BadRequest(f"{param}: a data URL must look like data:image/png;base64,<data>", param=param)
    try:
        return base64.b64decode(text.strip(), validate=False)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{param}: not valid base64; send a data URL or base64-encoded image", param=param) from None


async def image_bytes(value: str | ImageRef | bytes, param: str, fetch: UrlFetcher | None) -> bytes:
    """The bytes of an image given as bytes, a data URL, base64, ``{data_url}`` or ``{url}``."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, ImageRef):
        if value.data_url:
            return decode_b64(value.data_url, param)
        if value.url:
            if fetch is None:
                raise BadRequest(f"{param}: image URLs are not supported by this server; send a data URL", param=param)
            return await fetch(value.url, param)
        raise BadRequest(f"{param}: give either data_url or url", param=param)
    if value.startswith(("http://", "https://")):
        return await image_bytes(ImageRef(url=value), param, fetch)
    return decode_b64(value, param)


async def load_image(value: str | ImageRef | bytes, param: str, settings: Settings, fetch: UrlFetcher | None) -> tuple[bytes, Image.Image]:
    """(bytes, decoded image) of an image input; undecodable or oversized data is a 400."""
    data = await image_bytes(value, param, fetch)
    return data, await decode_off_loop(data, param, settings.limits.max_image_pixels)


class Inputs:
    """The input images of a job being built: blob key -> bytes, sent with the job."""

    def __init__(self, job_id: str | None = None) -> None:
        self.job_id = job_id or new_id()
        self.blobs: dict[str, bytes] = {}

    def add(self, name: str, data: bytes) -> str:
        key = input_key(self.job_id, name)
        self.blobs[key] = data
        return key


MAX_SIDE = 8192  # the request schema's largest width or height


def fit_size(width: int, height: int, max_pixels: int, step: int = 16) -> tuple[int, int]:
    """The nearest size a request may ask for: sides multiples of ``step`` within the
    schema's range, shrunk (aspect kept) to ``max_pixels`` (fix-it hints)."""
    w = min(MAX_SIDE, max(step, round(width / step) * step))
    h = min(MAX_SIDE, max(step, round(height / step) * step))
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        w, h = max(step, int(w * scale) // step * step), max(step, int(h * scale) // step * step)
    return w, h


def check_size(ms: ModelState, width: int, height: int, param: str = "width") -> None:
    """Within the model's max_pixels (each side is already a multiple of 16: the request
    schema and the config's default sizes require it)."""
    if width * height > ms.cfg.max_pixels:
        w, h = fit_size(width, height, ms.cfg.max_pixels)
        raise BadRequest(
            f"{width}x{height} is {width * height} pixels, over model {ms.name!r}'s max_pixels of {ms.cfg.max_pixels}; "
            f"choose a smaller size, e.g. {w}x{h}",
            param=param,
            code="too_many_pixels",
        )


def _expand_hint(e: Expand, grown: tuple[int, int], max_pixels: int) -> str:
    """Paddings that make the expanded size multiples of 16 (more on right/bottom, or
    less where more would pass max_pixels)."""
    right, bottom = e.right + (-grown[0] % 16), e.bottom + (-grown[1] % 16)
    size = (grown[0] + right - e.right, grown[1] + bottom - e.bottom)
    if size[0] * size[1] > max_pixels:  # round down instead, where the padding allows
        right, bottom = max(0, e.right - grown[0] % 16), max(0, e.bottom - grown[1] % 16)
        size = (grown[0] + right - e.right, grown[1] + bottom - e.bottom)
    parts = ([f"right {right}"] if grown[0] % 16 else []) + ([f"bottom {bottom}"] if grown[1] % 16 else [])
    return f"{' and '.join(parts)} (an image of {size[0]}x{size[1]})"


async def masked_edit(
    req: GenerateRequest,
    ms: ModelState,
    task: str,
    decoded: list[Image.Image],
    refs: list[str],
    inputs: Inputs,
    settings: Settings,
    fetch: UrlFetcher | None,
    upload: bytes | None,
) -> tuple[int, int, str]:
    """Check a masked edit or an outpaint (``expand``) and store its mask in the one
    convention (``masking``: L, 255 = repaint, the size of images[0], which
    ``expand`` replaces by the padded canvas).  The pipeline size: images[0]'s,
    rounded to multiples of 16, whatever width / height say (the result comes back
    at images[0]'s exact size)."""
    given = upload is not None or req.mask is not None
    param = "mask" if given else "expand"
    if task != "edit":
        raise BadRequest(f"{param} is for edits: send it to /api/edit (or /v1/images/edits) with images", param=param)
    if not ms.capabilities.supports_mask:
        raise BadRequest(
            f"model {ms.name!r} does not support masks (capabilities.supports_mask is false); "
            f"drop {param} to edit the whole image, or use a model that supports masks (see GET /api/models)",
            param=param,
        )
    first = decoded[0]
    mask: Image.Image | None = None
    if given:
        data = upload if upload is not None else await image_bytes(req.mask, "mask", fetch)  # type: ignore[arg-type]
        mask = await anyio.to_thread.run_sync(decode_mask, data, "mask", settings.limits.max_image_pixels)
        if mask.size != first.size:
            raise BadRequest(
                f"mask is {mask.width}x{mask.height} but the first image is {first.width}x{first.height}; "
                "send a mask of the same size as the first image",
                param="mask",
            )
    e = req.expand
    if e is not None and (e.left or e.right or e.top or e.bottom):
        grown = (first.width + e.left + e.right, first.height + e.top + e.bottom)
        if grown[0] * grown[1] > ms.cfg.max_pixels:
            raise BadRequest(
                f"expand makes the image {grown[0]}x{grown[1]}, over model {ms.name!r}'s max_pixels of "
                f"{ms.cfg.max_pixels}; expand less or send a smaller image",
                param="expand",
            )
        if grown[0] % 16 or grown[1] % 16:
            raise BadRequest(
                f"expand makes the image {grown[0]}x{grown[1]}; the result's width and height must be multiples of 16: "
                f"e.g. {_expand_hint(e, grown, ms.cfg.max_pixels)}",
                param="expand",
            )
        canvas, mask = expand_canvas(first, e.left, e.right, e.top, e.bottom, mask)
        inputs.blobs[refs[0]] = encode_png(canvas)
        first = canvas
    if mask is None:
        raise BadRequest("expand adds no pixels; give left, right, top or bottom (pixels to add)", param="expand")
    if is_all_keep(mask):
        raise BadRequest(
            "mask keeps every pixel: mark the area to edit with fully transparent pixels (a mask without alpha: white)",
            param="mask",
        )
    width, height = canvas_size(*first.size)  # width / height of the request do not apply
    return width, height, inputs.add("mask", encode_mask(mask))


async def build_job(
    req: GenerateRequest,
    ms: ModelState,
    settings: Settings,
    task: str,
    *,
    uploads: list[bytes] | None = None,
    fetch: UrlFetcher | None = None,
    mask: bytes | None = None,
) -> tuple[JobRecord, Inputs]:
    """Validate ``req`` for model ``ms`` and build the job (not yet queued) with its
    input images.  ``mask``: the bytes of a mask uploaded as a file (else ``req.mask``)."""
    cfg = ms.cfg
    caps = ms.capabilities
    prompts = list(req.prompts) if req.prompts else ([req.prompt] if req.prompt is not None else [])
    if req.prompts and req.prompt:
        raise BadRequest("give either prompt or prompts, not both", param="prompts")
    if not prompts or any(not p or not p.strip() for p in prompts):
        raise BadRequest("prompt is required and must not be empty; describe the image you want", param="prompt")
    if len(prompts) > settings.limits.max_prompts:
        raise BadRequest(f"prompts has {len(prompts)} entries; at most {settings.limits.max_prompts} per job", param="prompts")
    if task not in caps.tasks:
        other = "/api/edit" if task == "generate" else "/api/generate"
        raise BadRequest(
            f"model {ms.name!r} cannot {task} (it supports: {', '.join(caps.tasks)}); use {other} or another model",
            param="model",
        )
    width = req.width or cfg.default_width
    height = req.height or cfg.default_height
    check_size(ms, width, height)
    steps = req.steps or default_steps(cfg)
    if steps > settings.limits.max_steps:
        raise BadRequest(f"steps {steps} is over the limit of {settings.limits.max_steps}", param="steps")
    if req.n > caps.max_output_images:
        raise BadRequest(
            f"n {req.n} is over model {ms.name!r}'s max_output_images of {caps.max_output_images}; ask for fewer images",
            param="n",
        )
    fmt = parse_format(req.format)
    seed = parse_seed(req.seed)
    try:
        sampler, schedule = choose(cfg.backend, req.sampler, req.scheduler).stored
    except Unsupported as exc:
        raise BadRequest(f"model {ms.name!r}: {exc}", param=exc.param, code=exc.code) from None
    inputs = Inputs()
    max_pixels = settings.limits.max_image_pixels
    refs: list[str] = []
    decoded: list[Image.Image] = []
    for i, value in enumerate(req.images or []):
        data, img = await load_image(value, f"images[{i}]", settings, fetch)
        decoded.append(img)
        refs.append(inputs.add(f"ref{i}", data))
    for data in uploads or []:
        param = f"images[{len(refs)}]"
        decoded.append(await decode_off_loop(data, param, max_pixels))
        refs.append(inputs.add(f"ref{len(refs)}", data))
    if task == "edit":
        if not refs:
            raise BadRequest("an edit needs at least one reference image in images", param="images")
        if len(refs) > caps.max_images:
            raise BadRequest(
                f"{len(refs)} reference images given; model {ms.name!r} accepts at most {caps.max_images}",
                param="images",
            )
    elif refs:
        raise BadRequest("images are for edits: send them to /api/edit, or use init_image for img2img", param="images")
    mask_key: str | None = None
    mask_blur = 0
    if mask is not None or req.mask is not None or req.expand is not None:
        width, height, mask_key = await masked_edit(req, ms, task, decoded, refs, inputs, settings, fetch, mask)
        check_size(ms, width, height)
        mask_blur = req.mask_blur if req.mask_blur is not None else DEFAULT_BLUR
    init: str | None = None
    if req.init_image is not None:
        data, _ = await load_image(req.init_image, "init_image", settings, fetch)
        if not caps.supports_init_image:
            raise BadRequest(f"model {ms.name!r} does not do img2img; drop init_image", param="init_image")
        init = inputs.add("init", data)
    if req.deadline_seconds is not None and req.deadline_at is not None:
        raise BadRequest("give either deadline_seconds or deadline_at, not both", param="deadline_seconds")
    deadline = time.time() + req.deadline_seconds if req.deadline_seconds is not None else req.deadline_at
    loras = [Lora(lr.name, lr.scale) for lr in req.loras or []]
    if loras and not caps.supports_lora:
        raise BadRequest(f"model {ms.name!r} has no lora_dir configured, so loras cannot be used", param="loras")
    if len(loras) > 1 and cfg.compile == "regional":  # backends/lora.py: one adapter slot, swapped in place
        raise BadRequest(f"model {ms.name!r} compiles its denoiser and swaps one LoRA in place per job; send one LoRA", param="loras")
    for i, lora in enumerate(loras):
        try:
            resolve_lora(lora.name, cfg.lora_dir, ms.name)
        except BackendError as exc:
            raise BadRequest(f"loras[{i}]: {exc}", param="loras") from None
    # img2img without a strength runs the model's default_strength: the record says so
    strength = req.strength if req.strength is not None or init is None or mask_key is not None else cfg.default_strength
    if (init is not None or mask_key is not None) and strength is not None and run_steps(steps, strength, True) < 1:
        raise BadRequest(
            f"strength {strength:g} with {steps} steps leaves no denoising step (img2img runs steps x strength); "
            f"use at least {math.ceil(1 / max(strength, 1e-3))} steps or a higher strength",
            param="strength",
        )
    if req.cache is not None and (problem := cache_problem(ms.name, cfg, req.cache)) is not None:
        raise BadRequest(problem, param="cache", code="cache_unavailable")
    guidance = req.guidance if req.guidance is not None else cfg.recommended_guidance
    items = [
        Item(prompt=prompt, width=width, height=height, steps=steps, seed=seed + k * req.n, n=req.n, negative_prompt=req.negative_prompt,
             guidance=guidance, images=refs, init_image=init, strength=strength, mask=mask_key, mask_blur=mask_blur, loras=loras,
             cache=req.cache, sampler=sampler, scheduler=schedule)
        for k, prompt in enumerate(prompts)
    ]  # fmt: skip
    job = JobRecord(
        id=inputs.job_id,
        model=ms.name,
        task=task,
        items=items,
        priority=parse_priority(req.priority),
        format=fmt,
        quality=req.quality,
        metadata=req.metadata,
        upscale=req.upscale,
        upload_urls=req.upload_urls,
        webhook_url=req.webhook_url,
        inputs=list(inputs.blobs),
        deadline_at=deadline,
    )
    job.batch = batch_key(job, family(cfg).batches and cfg.target_inflight > 1)  # no class where nothing batches
    return job, inputs
