"""The OpenAI-compatible shim's translation layer: OpenAI image requests ->
``GenerateRequest`` (then the ordinary ``build_job``), finished jobs -> OpenAI
responses and stream events, job outcomes -> OpenAI errors.

Routes live in ``routes/openai.py``; this module knows nothing about HTTP.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import msgspec

from .build import MAX_SIDE, UrlFetcher, fit_size, image_bytes, parse_format
from .errors import ApiError, BadRequest, Conflict, JobFailed, Unavailable, validation_message
from .families import default_steps
from .jobs import JobRecord, JobStatus, image_tokens
from .quotas import gpu_seconds
from .schemas import GenerateRequest, ImageRef
from .schemas_openai import (
    CompletedEvent,
    EaselKnobs,
    InputTokensDetails,
    OpenAIImageInput,
    OpenAIImageRequest,
    OpenAIUsage,
    PartialImageEvent,
)

if TYPE_CHECKING:
    from .registry import ModelState
    from .service import Service

# quality -> fraction of the model's recommended_steps (an explicit steps wins)
QUALITY_STEPS = {"low": 0.5, "medium": 0.75, "high": 1.0, "auto": 1.0, "standard": 1.0, "hd": 1.0, "xhigh": 1.0, "max": 1.0}
SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
EVENT_PREFIX = {"generate": "image_generation", "edit": "image_edit"}
BACKGROUND = "opaque"  # every easel backend draws opaque images
BACKGROUNDS = ("opaque", "auto")  # accepted; both answer opaque


def parse_size(size: str | None, max_pixels: int) -> tuple[int, int] | None:
    """'WxH' -> (w, h); None or 'auto' -> None (the model's default size).  A refusal
    suggests a size the model takes."""
    if size is None or size.strip().lower() in ("", "auto"):
        return None
    m = SIZE.match(size)
    if m is None:
        raise BadRequest(f"size {size!r} is not WIDTHxHEIGHT; send e.g. '1024x1024', or 'auto' for the model's default", param="size")
    w, h = int(m[1]), int(m[2])
    near = "{}x{}".format(*fit_size(max(w, 1), max(h, 1), max_pixels))
    if w <= 0 or h <= 0 or w % 16 or h % 16 or max(w, h) > MAX_SIDE:
        raise BadRequest(
            f"size {size!r}: width and height must each be a multiple of 16 from 16 to {MAX_SIDE}; try {near}", param="size"
        )
    if w * h > max_pixels:
        raise BadRequest(f"size {size!r} is {w * h} pixels, over the model's max_pixels of {max_pixels}; try {near}",
                         param="size", code="too_many_pixels")  # fmt: skip
    return w, h


def quality_steps(quality: str | None, ms: ModelState) -> int | None:
    if quality is None:
        return None
    fraction = QUALITY_STEPS.get(quality.strip().lower())
    if fraction is None:
        raise BadRequest(f"quality {quality!r} is not supported; use low, medium, high or auto (or set steps)", param="quality")
    return max(1, round(default_steps(ms.cfg) * fraction))


def knobs(req: OpenAIImageRequest) -> dict[str, Any]:
    """easel knobs that were given: the top level wins over ``metadata``."""
    from_meta = EaselKnobs()
    if req.metadata:
        try:
            from_meta = msgspec.convert(req.metadata, EaselKnobs, strict=False)
        except msgspec.ValidationError as exc:
            message, param = validation_message(exc)
            raise BadRequest(f"metadata.{message}", param=f"metadata.{param}" if param else "metadata") from None
    out: dict[str, Any] = {}
    for name in EaselKnobs.__struct_fields__:
        value = getattr(req, name)
        out[name] = value if value is not None else getattr(from_meta, name)
    return {k: v for k, v in out.items() if v is not None}


def image_input(value: OpenAIImageInput, param: str) -> str | dict[str, str]:
    """An OpenAI/seed-000 image reference -> what ``GenerateRequest.images`` takes."""
    if isinstance(value, str):
        return value
    if value.file_id is not None:
        raise BadRequest(f"{param}: file ids are not supported (easel has no file store); send image_url or data_url as a data URL", param=param)
    if value.data_url:
        return {"data_url": value.data_url}
    link = value.image_url or value.url
    if link:
        return {"data_url": link} if link.startswith("data:") else {"url": link}
    raise BadRequest(f"{param}: give data_url (data:image/png;base64,...) or image_url", param=param)


def to_generate_request(req: OpenAIImageRequest, ms: ModelState) -> GenerateRequest:
    """Translate; ``decode`` re-validates every value against GenerateRequest's constraints."""
    check_background(req.background)
    fields: dict[str, Any] = {"prompt": req.prompt, "model": ms.name, "n": req.n, **knobs(req)}
    if "steps" not in fields and (steps := quality_steps(req.quality, ms)) is not None:
        fields["steps"] = steps
    if (size := parse_size(req.size, ms.cfg.max_pixels)) is not None:
        fields["width"], fields["height"] = size
    if req.output_format is not None:
        fields["format"] = parse_format(req.output_format, "output_format")
    if req.output_compression is not None:
        fields["quality"] = max(1, req.output_compression)
    if req.images:
        fields["images"] = [image_input(v, f"images[{i}]") for i, v in enumerate(req.images)]
    if req.metadata is not None:
        fields["metadata"] = req.metadata
    try:  # the fields were read from a validated OpenAI request: what fails here is the mapping of easel's knobs
        return msgspec.convert(fields, GenerateRequest, strict=False)
    except msgspec.ValidationError as exc:
        message, param = validation_message(exc)
        raise BadRequest(message, param=param) from None


def check_background(background: str | None) -> None:
    """``transparent`` needs a matte (an alpha channel cut around the subject): no easel
    model draws one, so it is refused rather than answered opaque."""
    if background is None or background.strip().lower() in BACKGROUNDS:
        return
    if background.strip().lower() == "transparent":
        raise BadRequest(
            "background 'transparent' is not supported: easel's models draw opaque images and easel does not matte "
            "(cut out) them; send background 'opaque' or 'auto' and remove the background afterwards",
            param="background",
        )
    raise BadRequest(f"background {background!r} is not supported; use opaque or auto", param="background")


async def load_mask(req: OpenAIImageRequest, upload: bytes | None, fetch: UrlFetcher | None) -> bytes | None:
    """The edit mask's bytes (a multipart file or JSON ``mask``); ``build_job`` checks it."""
    if upload is not None:
        return upload
    if req.mask is None:
        return None
    ref = image_input(req.mask, "mask")
    return await image_bytes(ref if isinstance(ref, str) else ImageRef(**ref), "mask", fetch)


def raise_for_outcome(service: Service, job: JobRecord) -> None:
    """A finished job that did not produce images -> the error the caller gets."""
    if job.status is JobStatus.DONE:
        return
    if job.status is JobStatus.ERROR:
        raise JobFailed(f"the job ran and failed: {job.message}")
    if not service.accepting:
        raise Unavailable(f"the server is shutting down ({job.message}); retry against a running server")
    raise Conflict(f"job {job.id} was cancelled ({job.message}); send the request again", code="job_cancelled")


# ----- responses ---------------------------------------------------------------------

class Echo(msgspec.Struct, kw_only=True):
    """What every response and event repeats about the request."""

    prefix: str
    quality: str
    output_format: str
    size: str = "auto"
    background: str = BACKGROUND

    @classmethod
    def of(cls, req: OpenAIImageRequest, job: JobRecord) -> Echo:
        item = job.items[0]
        return cls(
            prefix=EVENT_PREFIX[job.task],
            quality=(req.quality or "auto").lower(),
            output_format=job.format.lower(),
            size=f"{item.width}x{item.height}",
        )


def usage(job: JobRecord) -> OpenAIUsage:
    """Token counts as the worker stored them (``text_tokens``: the model's tokenizer;
    ``image_tokens``: the references at their sizes); a record without them (the job
    ended before counting) falls back to words and references at the output size."""
    text = job.text_tokens
    if text is None:
        text = sum(len(item.prompt.split()) for item in job.items)
    refs = job.image_tokens
    if refs is None:
        refs = sum(image_tokens(item.width, item.height) * len(item.images) for item in job.items)
    out = sum(image_tokens(r.width, r.height) for r in job.results)
    return OpenAIUsage(
        input_tokens=text + refs,
        output_tokens=out,
        total_tokens=text + refs + out,
        input_tokens_details=InputTokensDetails(text_tokens=text, image_tokens=refs),
        gpu_seconds=round(gpu_seconds(job), 4) if job.status.finished else None,
    )


def partial_event(echo: Echo, data: bytes, index: int) -> PartialImageEvent:
    return PartialImageEvent(
        type=f"{echo.prefix}.partial_image", b64_json=data, partial_image_index=index, created_at=int(time.time()),
        size=echo.size, quality=echo.quality, background=echo.background, output_format=echo.output_format,
    )


def completed_event(echo: Echo, job: JobRecord, data: bytes) -> CompletedEvent:
    return CompletedEvent(
        type=f"{echo.prefix}.completed", b64_json=data, created_at=int(time.time()), size=echo.size,
        quality=echo.quality, background=echo.background, output_format=echo.output_format, usage=usage(job),
    )


_encoder = msgspec.json.Encoder()


def sse(event: str, payload: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encoder.encode(payload) + b"\n\n"


def sse_error(exc: ApiError) -> bytes:
    """The SDK's stream parser raises ``APIError`` on a data payload with ``error``."""
    body = {"type": "error", "error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    return sse("error", body)

