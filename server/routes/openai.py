"""OpenAI-compatible image endpoints: POST /v1/images/generations and /v1/images/edits.

Requests take the same road as /api/generate (``build_job``, the model's priority
queue); the handler then waits for its job, or streams its partial images as
Server-Sent Events.  A caller that hangs up first cancels its job.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import caller_of
from ..errors import ApiError, BadRequest
from ..jobs import JobRecord, new_id
from ..openai_shim import (
    Echo,
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
from ..schemas_openai import CompletedEvent, OpenAIImage, OpenAIImageRequest, OpenAIImagesResponse, PartialImageEvent
from ..submission import submit_generation
from ..views import image_url
from .api import SSE_HEADERS
from .common import HEARTBEAT_SECONDS, base_url, decode_form, decode_json, json_response, service_of, wait_for

if TYPE_CHECKING:
    from ..service import Service

REQUEST_ID = "easel.request_id"  # scope key: the job's task id once the request made one
STATUSES = (400, 401, 403, 404, 409, 413, 429, 500, 503)


async def generations(request: Request) -> Response:
    return await answer(request, "generate")


async def edits(request: Request) -> Response:
    return await answer(request, "edit")


async def answer(request: Request, task: str) -> Response:
    service = service_of(request)
    req, job = await submit(request, task)
    echo = Echo.of(req, job)
    if req.stream:
        body = stream(service, job, echo, req.partial_images or 0, keep=bool(request.headers.get("idempotency-key")))
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    job = await wait_for(request, service, job)
    raise_for_outcome(service, job)
    return json_response(await images_response(request, service, req, job, echo))


async def submit(request: Request, task: str) -> tuple[OpenAIImageRequest, JobRecord]:
    """Decode (JSON, or multipart as the SDK sends edits), validate and queue."""
    service = service_of(request)
    mask_upload: bytes | None = None
    uploads: list[bytes] = []
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        req, uploads, named = await decode_form(request, OpenAIImageRequest)
        mask_upload = named.get("mask")
    else:
        req = await decode_json(request, OpenAIImageRequest)
    ms = await service.served_model(req.model)
    if task == "edit" and not (uploads or req.images):
        raise BadRequest(
            "an edit needs at least one image: send image (a multipart file; image[] for several) "
            "or JSON images: [{name, data_url}]",
            param="image",
        )
    mask = await load_mask(req, mask_upload, service.fetch_url)
    job = await submit_generation(
        service, to_generate_request(req, ms), task, caller_of(request.scope), model=ms, uploads=uploads, mask=mask,
        base_url=base_url(request), idempotency_key=request.headers.get("idempotency-key"),
        partial_images=(req.partial_images or 0) if req.stream else 0,
    )  # fmt: skip
    request.scope[REQUEST_ID] = job.id  # every response from here on names the job
    return req, job


async def images_response(
    request: Request, service: Service, req: OpenAIImageRequest, job: JobRecord, echo: Echo
) -> OpenAIImagesResponse:
    base = base_url(request)
    if req.response_format == "url":
        data = [OpenAIImage(url=service.sign(image_url(base, job, r.index), job, r.index), revised_prompt=r.prompt) for r in job.results]
    else:
        data = [OpenAIImage(b64_json=(await service.image(job, r.index, delete=False))[1], revised_prompt=r.prompt) for r in job.results]
    return OpenAIImagesResponse(
        created=int(job.finished_at or time.time()),
        data=data,
        output_format=echo.output_format,
        size=echo.size,
        quality=echo.quality,
        background=echo.background,
        usage=usage(job),
    )


async def stream(service: Service, job: JobRecord, echo: Echo, limit: int, keep: bool) -> AsyncIterator[bytes]:
    """Partial images as they come, then one ``completed`` event per image.  The
    response is cancelled when the caller disconnects; ``finally`` then cancels
    the job (a no-op once it has finished)."""
    sent = 0
    try:
        while True:
            while sent < min(job.previews, limit):
                data = await service.preview(job, sent)
                if data is not None:
                    yield sse(f"{echo.prefix}.partial_image", partial_event(echo, data, sent))
                sent += 1
            if job.status.finished:
                break
            job, changed = await service.wait_change(job, HEARTBEAT_SECONDS)
            if not changed:
                yield b": keep-alive\n\n"
        try:
            raise_for_outcome(service, job)
        except ApiError as exc:
            yield sse_error(exc)
            return
        for r in job.results:
            _, data = await service.image(job, r.index, delete=False)
            yield sse(f"{echo.prefix}.completed", completed_event(echo, job, data))
    finally:
        if not job.status.finished and not keep:
            await service.cancel(job)


class RequestIdMiddleware:
    """Every response under ``/v1/`` (success, error, stream) carries ``x-request-id``,
    which the openai SDK exposes as ``response._request_id``: the job's task id once
    a job exists (``scope[REQUEST_ID]``), else a fresh ``req_...`` id."""

    def __init__(self, app: ASGIApp, prefix: str = "/v1/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    rid = scope.get(REQUEST_ID) or f"req_{new_id()}"
                    message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _doc(summary: str, multipart: bool = False) -> Doc:
    return Doc(summary, body=OpenAIImageRequest, response=OpenAIImagesResponse, tags=("openai",), multipart=multipart, statuses=STATUSES,
               alternatives={"text/event-stream": (PartialImageEvent, CompletedEvent)})


ROUTES = [
    route("/v1/images/generations", generations, ["POST"], _doc(
        "OpenAI-compatible text-to-image; waits for the job (stream=true: Server-Sent Events with partial images)")),
    route("/v1/images/edits", edits, ["POST"], _doc(
        "OpenAI-compatible image edit: multipart (image / image[] / mask files) as the SDK sends it, "
        "or JSON with images: [{name, data_url}]", multipart=True)),
]
