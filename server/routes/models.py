"""Model lifecycle: /v1/models, /v1/admin/models (+ load/unload), GPU memory."""

from __future__ import annotations

import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from ..auth import OPEN, Caller, caller_of
from ..broker.base import ALL
from ..openapi import Doc, Param, route
from ..registry import ModelState, device_report
from ..samplers import samplers, schedules
from ..schemas import ModelInfo, ModelsResponse, PauseResponse, WorkerView
from ..service import ModelStatus, Service
from .common import json_response, service_of

NAME = Param("name", description="Model name from the configuration.", required=True, location="path")


async def model_info(service: Service, ms: ModelState, status: ModelStatus, forecasts: bool) -> ModelInfo:
    caps = ms.capabilities
    cfg = ms.cfg
    return ModelInfo(
        name=ms.name,
        backend=cfg.backend,
        state=status.state,  # type: ignore[arg-type]
        tasks=list(caps.tasks),
        max_images=caps.max_images,
        max_output_images=caps.max_output_images,
        max_pixels=cfg.max_pixels,
        default_width=cfg.default_width,
        default_height=cfg.default_height,
        recommended_steps=cfg.recommended_steps,
        recommended_guidance=cfg.recommended_guidance,
        samplers=[s.name for s in samplers(cfg.backend)],
        schedulers=[s.label for s in schedules(cfg.backend)] if samplers(cfg.backend) else [],
        queue_depth=status.waiting,
        running=status.running,
        load_error=status.load_error,
        vram_estimate_mib=cfg.vram_estimate_mib,
        size_mib=ms.size_mib,
        load_seconds=ms.load_seconds if ms.load_seconds is not None else next((w.load_seconds for w in status.workers if w.load_seconds is not None), None),
        forecast=await service.forecast_report(ms) if forecasts else None,
        workers=[
            WorkerView(worker=w.worker, host=w.host, state=w.state, slots=w.slots, running=w.running, load_error=w.load_error)
            for w in status.workers
        ],
        paused=status.paused,
    )


async def models_response(service: Service, forecasts: bool, caller: Caller = OPEN) -> ModelsResponse:
    models = service.models(caller)  # those the caller's allow-list lets it use
    statuses = await service.model_statuses(models)  # one moment for all: see Service.model_statuses
    return ModelsResponse(
        default_model=service.settings.default_model,
        models=[await model_info(service, ms, status, forecasts) for ms, status in zip(models, statuses, strict=True)],
    )


def openai_model(service: Service, ms: ModelState) -> dict[str, Any]:
    caps = ms.capabilities
    return {
        "id": ms.name,
        "object": "model",
        "created": int(service.started_at),
        "owned_by": "easel",
        "backend": ms.cfg.backend,
        "default": ms.name == service.settings.default_model,
        "capabilities": {
            "tasks": list(caps.tasks),
            "max_images": caps.max_images,
            "max_output_images": caps.max_output_images,
            "max_pixels": ms.cfg.max_pixels,
            "supports_lora": caps.supports_lora,
            "supports_mask": caps.supports_mask,
            "default_width": ms.cfg.default_width,
            "default_height": ms.cfg.default_height,
            "recommended_steps": ms.cfg.recommended_steps,
            "recommended_guidance": ms.cfg.recommended_guidance,
        },
    }


async def v1_models(request: Request) -> Response:
    service = service_of(request)
    data = [
        openai_model(service, ms) for ms in service.models(caller_of(request.scope)) if (await service.model_state(ms))[0] == "loaded"
    ]
    return json_response({"object": "list", "data": data})


async def admin_models(request: Request) -> Response:
    return json_response(await models_response(service_of(request), forecasts=True))


async def admin_load(request: Request) -> Response:
    service = service_of(request)
    ms = service.model(request.path_params["name"])  # 404 before anything starts
    if request.query_params.get("wait", "true").lower() in ("0", "false", "no"):
        await service.load(ms.name, wait=False)
        await anyio.sleep(0)
    else:
        await service.load(ms.name)
    info = await model_info(service, ms, await service.model_status(ms), forecasts=False)
    return json_response(info, status_code=200 if info.state != "error" else 500)


async def admin_unload(request: Request) -> Response:
    service = service_of(request)
    ms = service.model(request.path_params["name"])
    await service.unload(ms.name)
    return json_response(await model_info(service, ms, await service.model_status(ms), forecasts=False))


async def _pause_model(request: Request, paused: bool) -> Response:
    service = service_of(request)
    ms = service.model(request.path_params["name"])
    await service.pause(ms.name, paused)
    return json_response(await model_info(service, ms, await service.model_status(ms), forecasts=False))


async def admin_pause(request: Request) -> Response:
    return await _pause_model(request, True)


async def admin_resume(request: Request) -> Response:
    return await _pause_model(request, False)


async def _pause_all(request: Request, paused: bool) -> Response:
    names = await service_of(request).pause(ALL, paused)
    return json_response(PauseResponse(all=ALL in names, models=sorted(names - {ALL})))


async def queue_pause(request: Request) -> Response:
    return await _pause_all(request, True)


async def queue_resume(request: Request) -> Response:
    return await _pause_all(request, False)


async def gpu_memory(request: Request) -> Response:
    service = service_of(request)
    devices = await anyio.to_thread.run_sync(device_report)
    estimates = {}
    for ms in service.models():
        estimates[ms.name] = {"state": (await service.model_state(ms))[0], "vram_estimate_mib": ms.cfg.vram_estimate_mib}
    return json_response({"devices": devices, "models": estimates, "time": time.time()})


ROUTES = [
    route("/v1/models", v1_models, ["GET"], Doc("Loaded models (OpenAI shape) with capabilities", tags=("models",))),
    route("/v1/admin/models", admin_models, ["GET"], Doc("Every configured model with state, load error, queue and forecast", response=ModelsResponse, tags=("admin",), admin=True)),
    route("/v1/admin/models/{name}/load", admin_load, ["POST"], Doc("Load a model (off the event loop); ?wait=false returns at once while it loads", response=ModelInfo, tags=("admin",), params=(NAME, Param("wait", "boolean", "Wait for the load to finish (default true).")), admin=True, statuses=(404, 500))),
    route("/v1/admin/models/{name}/unload", admin_unload, ["POST"], Doc("Unload a model: queued jobs are cancelled, memory released", response=ModelInfo, tags=("admin",), params=(NAME,), admin=True, statuses=(404, 409))),
    route("/v1/admin/models/{name}/pause", admin_pause, ["POST"], Doc("Pause a model's queue: running jobs finish, new jobs queue, none starts until it resumes (survives API node restarts with Redis)", response=ModelInfo, tags=("admin",), params=(NAME,), admin=True, statuses=(404,))),
    route("/v1/admin/models/{name}/resume", admin_resume, ["POST"], Doc("Resume a paused model's queue (it stays paused while every queue is)", response=ModelInfo, tags=("admin",), params=(NAME,), admin=True, statuses=(404,))),
    route("/v1/admin/queue/pause", queue_pause, ["POST"], Doc("Pause every model's queue (running jobs finish, none starts)", response=PauseResponse, tags=("admin",), admin=True)),
    route("/v1/admin/queue/resume", queue_resume, ["POST"], Doc("Resume every queue (a model paused on its own stays paused)", response=PauseResponse, tags=("admin",), admin=True)),
    route("/v1/admin/gpu-memory", gpu_memory, ["GET"], Doc("Per-device memory (torch, nvidia-smi, process RSS) and model estimates", tags=("admin",), admin=True)),
]
