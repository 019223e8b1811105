"""The job API (/api/*), compatible with mflux-server's polling protocol."""

from __future__ import annotations

import base64
import time
import zlib
from collections.abc import AsyncIterator

import anyio.to_thread
import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .. import infotext, listing
from ..auth import caller_of
from ..build import decode_b64
from ..errors import BadRequest, Gone, NotFound
from ..jobs import JobRecord, JobStatus
from ..openapi import Doc, Param, route
from ..schemas import (
    CancelResponse,
    ClearResponse,
    GenerateRequest,
    ImageBase64,
    JobStatusResponse,
    LoadRequest,
    LoraRef,
    ModelsResponse,
    MoveRequest,
    PngInfoRequest,
    PngInfoResponse,
    SubmitResponse,
    TasksResponse,
    UpscaleRequest,
)
from ..service import FOLLOW_SECONDS, PREVIEW_WANT_SECONDS, Idempotency
from ..submission import submit_generation
from ..views import job_status, submitted
from .common import base_url, decode_form, decode_json, json_response, service_of, upscaler_of
from .models import models_response

TASK_ID = Param("task_id", description="The id returned at submission.", required=True)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def submit(request: Request, task: str) -> Response:
    service = service_of(request)
    uploads: list[bytes] = []
    mask: bytes | None = None
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        req, uploads, named = await decode_form(request, GenerateRequest)
        mask = named.get("mask")
    else:
        req = await decode_json(request, GenerateRequest)
    job = await submit_generation(
        service, req, task, caller_of(request.scope), uploads=uploads, mask=mask, base_url=base_url(request),
        idempotency_key=request.headers.get("idempotency-key"),
    )  # fmt: skip
    return accepted(job)


async def upscale(request: Request) -> Response:
    req = await decode_json(request, UpscaleRequest)
    idempotency = Idempotency.of(request.headers.get("idempotency-key"), b"upscale", msgspec.json.encode(req))
    job = await upscaler_of(request).submit(service_of(request), req, caller_of(request.scope), idempotency)
    return accepted(job)


def accepted(job: JobRecord) -> Response:
    return json_response(submitted(job))


async def generate(request: Request) -> Response:
    return await submit(request, "generate")


async def edit(request: Request) -> Response:
    return await submit(request, "edit")


async def _job(request: Request) -> JobRecord:
    task_id = request.query_params.get("task_id") or request.path_params.get("task_id")
    if not task_id:
        raise BadRequest("task_id is required (?task_id=...)", param="task_id")
    return await service_of(request).get(task_id, caller_of(request.scope))


def _float_param(request: Request, name: str, default: float, maximum: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if value != value:  # not a number (nan included)
        raise BadRequest(f"{name} {raw[:40]!r} is not a number; send seconds from 0 to {maximum:g}", param=name)
    return min(max(value, 0.0), maximum)


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} {raw[:40]!r} is not a whole number; send one from {lo} to {hi}", param=name) from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} {value} is out of range; send one from {lo} to {hi}", param=name)
    return value


async def status_of(request: Request, job: JobRecord) -> JobStatusResponse:
    service = service_of(request)
    job, where = await service.where(job)
    return job_status(job, base_url(request), where, service.sign)


async def status(request: Request) -> Response:
    service = service_of(request)
    job = await _job(request)
    wait = _float_param(request, "wait", 0.0, 300.0)
    if wait > 0 and (not job.status.finished or job.delivering):
        first = (job.status, job.delivering)  # a done job also waits for its uploads and webhook
        since = request.query_params.get("since")
        if since is not None and since != job.status.value:
            return json_response(await status_of(request, job))
        job = await service.wait_while(job, lambda j: (j.status, j.delivering) == first, time.monotonic() + wait)
    return json_response(await status_of(request, job))


def event_id(body: bytes) -> str:
    """An SSE event id: a client that reconnects with it as Last-Event-ID is not sent
    the same status again (the next event it gets is a change)."""
    return format(zlib.crc32(body), "08x")


def preview_event(job: JobRecord, data: bytes) -> bytes:
    """A ``preview`` SSE event: the latest live preview of a running job (a JPEG)."""
    image = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    body = msgspec.json.encode({"task_id": job.id, "step": job.preview_step, "image": image})
    return b"event: preview\ndata: " + body + b"\n\n"


async def events(request: Request) -> Response:
    """Server-Sent Events: one ``status`` event per change until the job ends; with
    ``previews=true`` also ``preview`` events (the latest live preview, a few a second
    at most) while it runs.  Whichever node the job was submitted to, the broker's
    events reach this one, and the ask for previews reaches its worker (the record's
    ``preview_wanted_until``, renewed while the stream lasts)."""
    service = service_of(request)
    job = await _job(request)
    heartbeat = _float_param(request, "heartbeat", 15.0, 60.0) or 15.0
    seen = request.headers.get("last-event-id")
    previews = request.query_params.get("previews", "false").lower() in ("1", "true", "yes")

    async def stream() -> AsyncIterator[bytes]:
        nonlocal job
        last = None
        sent_preview = 0  # preview_seq of the last preview sent
        wanted = 0.0  # when this stream last renewed its ask for previews
        quiet_since = time.monotonic()  # the last thing sent (keep-alives fill silences of a heartbeat)
        followed = 0.0  # when this stream last renewed its follow (worker writes every step)
        while True:
            if time.monotonic() - followed > FOLLOW_SECONDS / 3:
                await service.follow(job)
                followed = time.monotonic()
            body = msgspec.json.encode(await status_of(request, job))
            ident = event_id(body)
            if body != last and ident != seen:
                yield b"id: " + ident.encode() + b"\nevent: status\ndata: " + body + b"\n\n"
                quiet_since = time.monotonic()
            last = body
            if job.status.finished:
                yield b"event: end\ndata: " + msgspec.json.encode({"status": job.status.value}) + b"\n\n"
                return
            if previews:
                if time.monotonic() - wanted > PREVIEW_WANT_SECONDS / 3:
                    await service.want_previews(job)
                    wanted = time.monotonic()
                if job.preview_seq != sent_preview and (data := await service.live_preview(job)) is not None:
                    yield preview_event(job, data)
                    quiet_since = time.monotonic()
                sent_preview = job.preview_seq
            wait = min(heartbeat, PREVIEW_WANT_SECONDS / 3) if previews else heartbeat
            job, changed = await service.wait_change(job, wait)
            if not changed and time.monotonic() - quiet_since >= heartbeat - 0.01:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


async def image(request: Request) -> Response:
    service = service_of(request)
    q = request.query_params
    try:
        index = int(q.get("index", "0"))
    except ValueError:
        raise BadRequest(f"index {q.get('index', '')[:40]!r} is not a whole number; send 0 for the first image", param="index") from None
    job = await _job(request)
    as_b64 = q.get("base64", "false").lower() in ("1", "true", "yes")
    delete = q.get("delete", "false").lower() in ("1", "true", "yes")
    wait = _float_param(request, "wait", 0.0, 300.0)
    # submit, then one request for the image
    job = await service.wait_while(job, lambda j: not j.status.finished, time.monotonic() + wait)
    if job.status is not JobStatus.DONE:
        if job.status in (JobStatus.ERROR, JobStatus.CANCELLED):
            raise Gone(f"task {job.id} ended as {job.status.value}: {job.message}", param="task_id")
        raise NotFound(f"task {job.id} is {job.status.value}; poll /api/status until it is done", param="task_id", code="not_ready")
    result, data = await service.image(job, index, delete=delete)
    if as_b64:
        return json_response(ImageBase64(image=base64.b64encode(data).decode(), format=result.format))
    return Response(data, media_type=result.media_type, headers={"X-Seed": str(result.seed)})


async def tasks(request: Request) -> Response:
    service = service_of(request)
    limit = _int_param(request, "limit", 50, 1, 1000)
    before = _cursor(request.query_params.get("cursor"))
    flt, scope = listing.parse(request.query_params, caller_of(request.scope), service)
    return json_response(await listing.tasks(service, flt, scope, limit, before, base_url(request)))


def _cursor(raw: str | None) -> tuple[float, str] | None:
    """A ``next_cursor`` of /api/tasks: "<finished_at>_<task id>"."""
    if raw is None or raw == "":
        return None
    at, sep, task_id = raw.rpartition("_")
    try:
        finished_at = float(at)
    except ValueError:
        finished_at = float("nan")
    if not sep or not task_id or finished_at != finished_at or abs(finished_at) == float("inf"):
        raise BadRequest(f"cursor {raw[:60]!r} is not a next_cursor of /api/tasks; send the one the last page gave", param="cursor")
    return finished_at, task_id


async def cancel(request: Request) -> Response:
    service = service_of(request)
    job = await service.cancel(await _job(request))
    if job.status is JobStatus.RUNNING and request.query_params.get("wait", "1") != "0":
        # wait (briefly) for the backend to stop at its next step
        job = await service.wait_while(job, lambda j: j.status is JobStatus.RUNNING, time.monotonic() + 10)
    return json_response(CancelResponse(task_id=job.id, status=job.status.value))


async def move(request: Request) -> Response:
    """A waiting job to the front or the back (server/queue.py: of its owner's jobs;
    an admin's front: first of its priority)."""
    req = await decode_json(request, MoveRequest)
    job = await service_of(request).move(await _job(request), req.to, caller_of(request.scope))
    return json_response(await status_of(request, job))


async def clear(request: Request) -> Response:
    return json_response(ClearResponse(cancelled=await service_of(request).clear(caller_of(request.scope))))


async def png_info(request: Request) -> Response:
    """The generation parameters an image file carries, as /api/generate fields."""
    service = service_of(request)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        req, files, named = await decode_form(request, PngInfoRequest)
        data = files[0] if files else named.get("file")
    else:
        req = await decode_json(request, PngInfoRequest)
        data = None
    if data is None:
        if req.image is None:
            raise BadRequest("send the image: a multipart file in the field image, or JSON {\"image\": data URL or base64}", param="image")
        data = decode_b64(req.image, "image")
    text = await anyio.to_thread.run_sync(infotext.read_bytes, data, "image", service.settings.limits.max_image_pixels)
    if text is None:
        return json_response(PngInfoResponse())
    fields = infotext.parse(text)
    loras = [LoraRef(name=lr["name"], scale=lr["scale"]) for lr in fields.pop("loras", [])] or None
    return json_response(PngInfoResponse(parameters=text, loras=loras, **fields))


async def ls(request: Request) -> Response:
    return json_response(await models_response(service_of(request), forecasts=False, caller=caller_of(request.scope)))


async def ps(request: Request) -> Response:
    return json_response(await models_response(service_of(request), forecasts=True, caller=caller_of(request.scope)))


async def load(request: Request) -> Response:
    service = service_of(request)
    req = await decode_json(request, LoadRequest)
    await service.load(req.model)
    return json_response(await models_response(service, forecasts=False, caller=caller_of(request.scope)))


ROUTES = [
    route("/api/generate", generate, ["POST"], Doc("Queue a text-to-image job", body=GenerateRequest, response=SubmitResponse, tags=("jobs",), multipart=True, statuses=(400, 403, 404, 409, 413, 429))),
    route("/api/edit", edit, ["POST"], Doc("Queue an image edit (1..max_images references)", body=GenerateRequest, response=SubmitResponse, tags=("jobs",), multipart=True, statuses=(400, 403, 404, 409, 413, 429))),
    route("/api/upscale", upscale, ["POST"], Doc("Queue an upscale of one image (the upscaler is loaded on demand)", body=UpscaleRequest, response=SubmitResponse, tags=("jobs",), statuses=(400, 403, 404, 409, 413, 429))),
    route("/api/status", status, ["GET"], Doc("Status, position, forecast and progress of a job", response=JobStatusResponse, tags=("jobs",), params=(TASK_ID, Param("wait", "number", "Long-poll: seconds to wait for the status to change (for a done job: for its uploads and webhook to finish)."), Param("since", "string", "With wait: the status the caller already knows; answers at once if it differs.")))),
    route("/api/events", events, ["GET"], Doc("Server-Sent Events: every status change until the job ends (previews=true: also live preview images)", tags=("jobs",), content="text/event-stream", params=(TASK_ID, Param("previews", "boolean", "Also send preview events while the job runs: {task_id, step, image: a data:image/jpeg;base64 URL}, at most 4 a second, at most 256 px a side."), Param("heartbeat", "number", "Seconds of silence before a keep-alive comment (default 15).")))),
    route("/api/image", image, ["GET"], Doc("The image bytes (or {image: base64} with base64=true)", tags=("jobs",), content="image/png", params=(TASK_ID, Param("index", "integer", "Which image of the job (0-based)."), Param("base64", "boolean", "Answer JSON with base64 data."), Param("delete", "boolean", "Forget the image after this fetch."), Param("wait", "number", "Seconds to wait for the job to finish first (then the bytes, in one request).")), statuses=(400, 404, 410), alternatives={"application/json": (ImageBase64,)}), name="api_image"),
    route("/api/tasks", tasks, ["GET"], Doc("The queue and recent jobs: filtered, one page of recent at a time, with totals", response=TasksResponse, tags=("jobs",), params=(
        Param("limit", "integer", "At most this many of each (1 to 1000; default 50)."),
        Param("cursor", "string", "The next_cursor of the previous page: the next page of recent (send the same filters)."),
        Param("status", "string", "Only jobs of these statuses, comma-separated: waiting, running, done, error, cancelled."),
        Param("model", "string", "Only jobs of this model."),
        Param("since", "number", "Only jobs submitted at or after this unix time."),
        Param("scope", "string", "own (a key's default): the caller's jobs; shared: also every other key's waiting and running jobs, private (without prompts, images, metadata) unless the caller is an admin; all (admins only, their default): every job in full."),
    ), statuses=(400, 403, 404))),
    route("/api/cancel", cancel, ["GET", "POST"], Doc("Cancel a queued or running job", response=CancelResponse, tags=("jobs",), params=(TASK_ID,))),
    route("/api/tasks/{task_id}", cancel, ["DELETE"], Doc("Cancel a queued or running job", response=CancelResponse, tags=("jobs",), params=(TASK_ID,))),
    route("/api/tasks/{task_id}/move", move, ["POST"], Doc("Move a waiting job to the front or the back of its owner's jobs (an admin: front of its priority)", body=MoveRequest, response=JobStatusResponse, tags=("jobs",), params=(TASK_ID,), statuses=(400, 404, 409))),
    route("/api/clear", clear, ["GET", "POST"], Doc("Cancel every queued job", response=ClearResponse, tags=("jobs",))),
    route("/api/ls", ls, ["GET"], Doc("Configured models", response=ModelsResponse, tags=("models",))),
    route("/api/ps", ps, ["GET"], Doc("Models with queue state and learned forecast coefficients", response=ModelsResponse, tags=("models",))),
    route("/api/load", load, ["POST"], Doc("Load a model", body=LoadRequest, response=ModelsResponse, tags=("models",), admin=True)),
    route("/api/png-info", png_info, ["POST"], Doc("The generation parameters an image carries (A1111 infotext), as /api/generate fields; parameters null when it has none", body=PngInfoRequest, response=PngInfoResponse, tags=("jobs",), multipart=True, statuses=(400, 413))),
]

