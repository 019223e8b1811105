"""OpenAI-compatible image endpoints: POST /v1/images/generations and /v1/images/edits.

Requests take the same road as /api/generate (``build_job``, the model's priority
queue); the handler then waits for its job, or streams its partial images as
Server-Sent Events.  A caller that hangs up first cancels its job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..build import build_job
from ..errors import ApiError, BadRequest
from ..jobs import Job
from ..openai_shim import (
    Echo,
    Previews,
    completed_event,
    load_mask,
    partial_event,
    raise_for_outcome,
    sse,
    sse_error,
    to_generate_request,
    usage,
)
from ..openapi import Doc, route
from ..schemas_openai import OpenAIImage, OpenAIImageRequest, OpenAIImagesResponse
from ..worker import encode
from .api import SSE_HEADERS
from .common import decode_form, decode_json, engine_of, image_url, json_response

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("easel")
HEARTBEAT_SECONDS = 15.0
STATUSES = (400, 401, 404, 409, 413, 429, 500, 503)


async def generations(request: Request) -> Response:
    return await answer(request, "generate")


async def edits(request: Request) -> Response:
    return await answer(request, "edit")


async def answer(request: Request, task: str) -> Response:
    engine = engine_of(request)
    req, job, previews = await submit(request, task)
    echo = Echo.of(req, job)
    if previews is not None:
        body = stream(engine, job, previews, echo, req.partial_images or 0)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    await wait_for(request, engine, job)
    raise_for_outcome(engine, job)
    return json_response(images_response(request, req, job, echo))


async def submit(request: Request, task: str) -> tuple[OpenAIImageRequest, Job, Previews | None]:
    """Decode (JSON, or multipart as the SDK sends edits), validate and queue."""
    engine = engine_of(request)
    mask_upload: bytes | None = None
    uploads: list[bytes] = []
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        req, uploads, named = await decode_form(request, OpenAIImageRequest)
        mask_upload = named.get("mask")
    else:
        req = await decode_json(request, OpenAIImageRequest)
    ms = engine.loaded_model(req.model)
    if task == "edit" and not (uploads or req.images):
        raise BadRequest(
            "an edit needs at least one image: send image (a multipart file; image[] for several) "
            "or JSON images: [{name, data_url}]",
            param="image",
        )
    mask = await load_mask(req, mask_upload, ms, engine.settings, engine.fetch_url)
    job = await build_job(to_generate_request(req, ms), ms, engine.settings, task, uploads=uploads, fetch=engine.fetch_url)
    for item in job.items:
        item.mask = mask
    await engine.run_submit_checks(job)
    previews = Previews(job, req.partial_images or 0, asyncio.get_running_loop()) if req.stream else None
    engine.submit(ms, job)
    return req, job, previews


async def wait_for(request: Request, engine: Engine, job: Job) -> None:
    """Wait until ``job`` ends; if the caller disconnects first, cancel the job so no
    GPU time goes to an answer nobody reads."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        log.info("job %s: the caller disconnected; cancelling", job.id)
        engine.cancel(job)

    watcher = asyncio.create_task(watch())
    try:
        while not job.status.finished:
            await job.wait_change(None, progress=False)
    finally:
        watcher.cancel()


def images_response(request: Request, req: OpenAIImageRequest, job: Job, echo: Echo) -> OpenAIImagesResponse:
    if req.response_format == "url":
        data = [OpenAIImage(url=image_url(request, job, r.index), revised_prompt=r.prompt) for r in job.results]
    else:
        data = [OpenAIImage(b64_json=r.data or b"", revised_prompt=r.prompt) for r in job.results]
    return OpenAIImagesResponse(
        created=int(job.finished_at or time.time()),
        data=data,
        output_format=echo.output_format,
        size=echo.size,
        quality=echo.quality,
        background=echo.background,
        usage=usage(job),
    )


async def stream(engine: Engine, job: Job, previews: Previews, echo: Echo, limit: int) -> AsyncIterator[bytes]:
    """Partial images as they come, then one ``completed`` event per image.  The
    response is cancelled when the caller disconnects; ``finally`` then cancels
    the job (a no-op once it has finished)."""
    sent = 0
    try:
        while True:
            while previews.pending:
                image = previews.pending.popleft()
                if sent < limit:
                    data = await engine.encoder.run(encode, image, job.format, job.quality)
                    yield sse(f"{echo.prefix}.partial_image", partial_event(echo, data, sent))
                    sent += 1
            if job.status.finished:
                break
            if not await job.wait_change(HEARTBEAT_SECONDS):
                yield b": keep-alive\n\n"
        try:
            raise_for_outcome(engine, job)
        except ApiError as exc:
            yield sse_error(exc)
            return
        for r in job.results:
            yield sse(f"{echo.prefix}.completed", completed_event(echo, job, r.data or b""))
    finally:
        engine.cancel(job)


def _doc(summary: str, multipart: bool = False) -> Doc:
    return Doc(summary, body=OpenAIImageRequest, response=OpenAIImagesResponse, tags=("openai",), multipart=multipart, statuses=STATUSES)


ROUTES = [
    route("/v1/images/generations", generations, ["POST"], _doc(
        "OpenAI-compatible text-to-image; waits for the job (stream=true: Server-Sent Events with partial images)")),
    route("/v1/images/edits", edits, ["POST"], _doc(
        "OpenAI-compatible image edit: multipart (image / image[] / mask files) as the SDK sends it, "
        "or JSON with images: [{name, data_url}]", multipart=True)),
]
