"""AUTOMATIC1111's API (``/sdapi/v1``), for the clients that speak it (Open WebUI,
SillyTavern, webuiapi, ...).

txt2img, img2img and extra-single-image are ordinary easel jobs (``build_job``,
``Service.submit``: priority, forecast, quotas, ownership, metrics); the request
waits for its job, and a caller that hangs up first cancels it (``wait_for``, as
the OpenAI shim).  Translation lives in ``sdapi_shim``."""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import anyio.to_thread
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response

from .. import infotext, sdapi_shim
from ..allowlist import may_use_lora
from ..auth import Caller, caller_of
from ..build import decode_b64
from ..errors import JobFailed, Unavailable
from ..families import UPSCALERS
from ..jobs import JobRecord, JobStatus
from ..openapi import Doc, Param, route
from ..schemas import UpscaleRequest
from ..schemas_sdapi import (
    SdExtraSingleImageRequest,
    SdExtraSingleImageResponse,
    SdImagesResponse,
    SdImg2ImgRequest,
    SdLora,
    SdModel,
    SdNamed,
    SdOptionsRequest,
    SdPngInfoRequest,
    SdPngInfoResponse,
    SdProgressResponse,
    SdProgressState,
    SdTxt2ImgRequest,
    SdUpscaler,
    SdVae,
)
from ..service import Service
from ..submission import submit_generation
from ..training.adapters import list_adapters
from ..version import __version__
from .common import base_url, decode, json_response, read_body, service_of, upscaler_of, wait_for

PREFIX = "/sdapi/v1"
TAGS = ("sdapi",)
JOB_STATUSES = (400, 401, 403, 404, 409, 413, 429, 500, 503)


async def txt2img(request: Request) -> Response:
    return await generate(request, SdTxt2ImgRequest)


async def img2img(request: Request) -> Response:
    return await generate(request, SdImg2ImgRequest)


async def generate(request: Request, typ: type[SdTxt2ImgRequest]) -> Response:
    service = service_of(request)
    caller = caller_of(request.scope)
    body = sdapi_shim.decode_object(await read_body(request))
    req = decode(body, typ)
    ms = await service.served_model(await sdapi_shim.model_for(service, caller, req))
    mask: bytes | None = None
    if isinstance(req, SdImg2ImgRequest):
        task, gen = sdapi_shim.img2img_request(req, ms)
        if req.mask is not None:
            size = sdapi_shim.image_size(req.init_images[0], "init_images[0]")
            invert = bool(req.inpainting_mask_invert)
            mask = await anyio.to_thread.run_sync(sdapi_shim.a1111_mask, req.mask, size, invert, service.settings.limits.max_image_pixels)
    else:
        task, gen = "generate", sdapi_shim.txt2img_request(req, ms)
    job = await submit_generation(
        service, gen, task, caller, model=ms, mask=mask, base_url=base_url(request), idempotency_key=request.headers.get("idempotency-key")
    )
    job = await finished(request, service, job)
    images = [_b64((await service.image(job, r.index, delete=False))[1]) for r in job.results] if req.send_images else []
    if isinstance(req, SdImg2ImgRequest) and req.include_init_images:
        images += [_bare(i) for i in req.init_images]
    ignored = sorted(sdapi_shim.ignored(body, typ) + sdapi_shim.sampling(req, ms.cfg.backend)[1])
    return json_response(SdImagesResponse(images=images, parameters=body, info=sdapi_shim.info(job, req, ignored)))


async def finished(request: Request, service: Service, job: JobRecord) -> JobRecord:
    """Wait for ``job``; an interrupted (cancelled) job answers with what it made, as
    A1111 does; a failed one is a 500."""
    job = await wait_for(request, service, job)
    if job.status is JobStatus.ERROR:
        raise JobFailed(f"the job ran and failed: {job.message}")
    if job.status is JobStatus.CANCELLED and not service.accepting:
        raise Unavailable(f"the server is shutting down ({job.message}); retry against a running server")
    return job


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bare(image: str) -> str:
    return image.partition(",")[2] if image.startswith("data:") else image


async def progress(request: Request) -> Response:
    """The caller's current job: its running one, else the first waiting."""
    service = service_of(request)
    jobs = [j for j in await service.queue(1000, caller_of(request.scope)) if j.task != "train"]
    if not jobs:
        return json_response(SdProgressResponse(progress=0.0, eta_relative=0.0, state=SdProgressState()))
    job, where = await service.where(jobs[0])
    per = max(1, job.items[0].steps)
    job_no = min(job.step // per, len(job.items) - 1)
    current: str | None = None
    if job.status is JobStatus.RUNNING and request.query_params.get("skip_current_image", "false").lower() != "true":
        await service.want_previews(job)  # the worker draws previews while someone asks
        if (data := await service.live_preview(job)) is not None:
            current = await anyio.to_thread.run_sync(_png_base64, data)
    state = SdProgressState(
        job=job.id, job_count=sum(len(j.items) for j in jobs), job_no=job_no, sampling_step=job.step - job_no * per,
        sampling_steps=per, job_timestamp=str(int(job.created_at)),
    )  # fmt: skip
    return json_response(SdProgressResponse(
        progress=round(job.progress, 4), eta_relative=round(where.wait or 0.0, 3), state=state, current_image=current,
        textinfo=f"{job.status.value}: step {job.step} of {job.total_steps}" + (f", {where.pos} ahead" if where.pos else ""),
    ))  # fmt: skip


def _png_base64(jpeg: bytes) -> str:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, "PNG")
    return _b64(out.getvalue())


async def interrupt(request: Request) -> Response:
    """Cancel the caller's running jobs (A1111's interrupt and skip both stop the
    current generation; easel cannot skip one image of a job)."""
    service = service_of(request)
    for job in await service.queue(1000, caller_of(request.scope)):
        if job.status is JobStatus.RUNNING and job.task != "train":
            await service.cancel(job)
    return json_response(None)


async def sd_models(request: Request) -> Response:
    return json_response([sdapi_shim.sd_model(ms) for ms in sdapi_shim.image_models(service_of(request), caller_of(request.scope))])


async def _current(service: Service, caller: Caller) -> str:
    return await sdapi_shim.selected_model(service, caller) or service.model(None).name


async def options(request: Request) -> Response:
    service = service_of(request)
    caller = caller_of(request.scope)
    if request.method == "POST":
        req = decode(sdapi_shim.decode_object(await read_body(request)), SdOptionsRequest)
        if req.sd_model_checkpoint:
            await sdapi_shim.select_model(service, caller, sdapi_shim.find_checkpoint(service, req.sd_model_checkpoint).name)
        return json_response(None)
    name = await _current(service, caller)
    return json_response({"sd_model_checkpoint": name, "sd_checkpoint_hash": sdapi_shim.model_hash(name),
                          "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1})  # fmt: skip


async def samplers(request: Request) -> Response:
    """The samplers of the caller's model (its pick with POST /options, else the default)."""
    service = service_of(request)
    return json_response(sdapi_shim.samplers(service.model(await _current(service, caller_of(request.scope))).cfg.backend))


async def schedulers(request: Request) -> Response:
    service = service_of(request)
    return json_response(sdapi_shim.schedulers(service.model(await _current(service, caller_of(request.scope))).cfg.backend))


async def loras(request: Request) -> Response:
    service, caller = service_of(request), caller_of(request.scope)
    ms = service.model(await _current(service, caller))
    found = [a for a in list_adapters(ms.cfg.lora_dir) if may_use_lora(caller, a[0])] if ms.cfg.lora_dir else []
    return json_response([SdLora(name=name, alias=name, path=str(path), metadata=meta or {}) for name, path, meta in found])


async def upscalers(request: Request) -> Response:
    service = service_of(request)
    out = [SdUpscaler(name="None")]
    out += [SdUpscaler(name=ms.name, model_name=ms.name, model_path=ms.cfg.model_path)
            for ms in service.models(caller_of(request.scope)) if ms.cfg.backend in UPSCALERS]  # fmt: skip
    return json_response(out)


async def sd_vae(request: Request) -> Response:
    return json_response([])


async def latent_upscale_modes(request: Request) -> Response:
    return json_response([])


async def cmd_flags(request: Request) -> Response:
    service = service_of(request)
    return json_response({"api": True, "nowebui": False, "api_auth": service.keys.enabled, "listen": True,
                          "port": service.settings.port, "easel": __version__})  # fmt: skip


async def memory(request: Request) -> Response:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return json_response({"ram": {"free": free, "used": total - free, "total": total},
                          "cuda": {"error": "easel reports GPU memory at /v1/admin/gpu-memory"}})  # fmt: skip


async def scripts(request: Request) -> Response:
    return json_response({"txt2img": [], "img2img": []})


async def png_info(request: Request) -> Response:
    service = service_of(request)
    req = decode(sdapi_shim.decode_object(await read_body(request)), SdPngInfoRequest)
    data = decode_b64(req.image, "image")
    text = await anyio.to_thread.run_sync(infotext.read_bytes, data, "image", service.settings.limits.max_image_pixels)
    if text is None:
        return json_response(SdPngInfoResponse(info="", items={}, parameters={}))
    return json_response(SdPngInfoResponse(info=text, items={"parameters": text}, parameters=sdapi_shim.png_parameters(text)))


async def extra_single_image(request: Request) -> Response:
    """Upscale one image with the configured upscaler (or the one ``upscaler_1`` names)."""
    service = service_of(request)
    req = decode(sdapi_shim.decode_object(await read_body(request)), SdExtraSingleImageRequest)
    model = req.upscaler_1 if req.upscaler_1 and req.upscaler_1 not in ("None", "Lanczos", "Nearest") else None
    up = UpscaleRequest(image=req.image, scale=4 if req.upscaling_resize > 3 else 2, model=model)
    job = await upscaler_of(request).submit(service, up, caller_of(request.scope), None)
    job = await finished(request, service, job)
    if not job.results:
        return json_response(SdExtraSingleImageResponse(image="", html_info=f"interrupted: {job.message}"))
    _, data = await service.image(job, 0, delete=False)
    return json_response(SdExtraSingleImageResponse(image=_b64(data)))


def _doc(summary: str, body: type | None = None, response: type | None = None, statuses: tuple[int, ...] = (400, 401)) -> Doc:
    return Doc(summary, body=body, response=response, tags=TAGS, statuses=statuses)


def _list(summary: str, item: type) -> Doc:
    return Doc(summary, response=item, many=True, tags=TAGS, statuses=(401,))


ROUTES: list[Any] = [
    route(f"{PREFIX}/txt2img", txt2img, ["POST"], _doc(
        "A1111 txt2img as an easel job: waits for it (a caller that hangs up cancels it); unknown fields are "
        "accepted and listed in info.ignored", SdTxt2ImgRequest, SdImagesResponse, JOB_STATUSES)),
    route(f"{PREFIX}/img2img", img2img, ["POST"], _doc(
        "A1111 img2img / inpaint (mask) as an easel job", SdImg2ImgRequest, SdImagesResponse, JOB_STATUSES)),
    route(f"{PREFIX}/extra-single-image", extra_single_image, ["POST"], _doc(
        "Upscale one image (Real-ESRGAN) as an easel job", SdExtraSingleImageRequest, SdExtraSingleImageResponse, JOB_STATUSES)),
    route(f"{PREFIX}/progress", progress, ["GET"], Doc(
        "The caller's current job: progress, easel's forecast as eta_relative, the live preview as current_image",
        response=SdProgressResponse, tags=TAGS, params=(Param("skip_current_image", "boolean", "Leave out current_image."),))),
    route(f"{PREFIX}/interrupt", interrupt, ["POST"], _doc("Stop the caller's running jobs")),
    route(f"{PREFIX}/skip", interrupt, ["POST"], _doc("As interrupt: easel cannot skip one image of a job")),
    route(f"{PREFIX}/options", options, ["GET", "POST"], _doc(
        "GET: the caller's model as sd_model_checkpoint; POST sd_model_checkpoint: the model of the caller's later "
        "sdapi jobs (others' are unchanged); other options are ignored", SdOptionsRequest)),
    route(f"{PREFIX}/sd-models", sd_models, ["GET"], _list("Models that generate or edit, as A1111 checkpoints", SdModel)),
    route(f"{PREFIX}/samplers", samplers, ["GET"], _list(
        "The samplers the caller's model runs (others are accepted and listed in info.ignored)", SdNamed)),
    route(f"{PREFIX}/schedulers", schedulers, ["GET"], _list("The schedules the caller's model's samplers take", SdNamed)),
    route(f"{PREFIX}/loras", loras, ["GET"], _list("LoRAs in the caller's model's lora_dir, for <lora:NAME:SCALE>", SdLora)),
    route(f"{PREFIX}/upscalers", upscalers, ["GET"], _list("Upscaler models", SdUpscaler)),
    route(f"{PREFIX}/sd-vae", sd_vae, ["GET"], _list("VAEs (none: each model uses its own)", SdVae)),
    route(f"{PREFIX}/latent-upscale-modes", latent_upscale_modes, ["GET"], _list("Latent upscale modes (none: hires fix is not done)", SdNamed)),
    route(f"{PREFIX}/cmd-flags", cmd_flags, ["GET"], _doc("A few of A1111's command-line flags")),
    route(f"{PREFIX}/memory", memory, ["GET"], _doc("Host RAM (GPU memory: /v1/admin/gpu-memory)")),
    route(f"{PREFIX}/scripts", scripts, ["GET"], _doc("Scripts (none)")),
    route(f"{PREFIX}/png-info", png_info, ["POST"], _doc("The infotext an image carries", SdPngInfoRequest, SdPngInfoResponse, (400, 401, 413))),
]
