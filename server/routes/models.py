"""Model lifecycle: /v1/models, /v1/admin/models (+ load/unload), GPU memory."""

from __future__ import annotations

import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from ..engine import Engine
from ..openapi import Doc, Param, route
from ..registry import ModelState, device_report
from ..schemas import ModelInfo, ModelsResponse
from .common import engine_of, json_response

NAME = Param("name", description="Model name from the configuration.", required=True, location="path")


def model_info(ms: ModelState, forecasts: bool) -> ModelInfo:
    caps = ms.capabilities
    cfg = ms.cfg
    return ModelInfo(
        name=ms.name,
        backend=cfg.backend,
        state=ms.state,
        tasks=list(caps.tasks),
        max_images=caps.max_images,
        max_output_images=caps.max_output_images,
        max_pixels=cfg.max_pixels,
        default_width=cfg.default_width,
        default_height=cfg.default_height,
        recommended_steps=cfg.recommended_steps,
        recommended_guidance=cfg.recommended_guidance,
        queue_depth=len(ms.queue),
        running=len(ms.running),
        load_error=ms.load_error,
        vram_estimate_mib=cfg.vram_estimate_mib,
        forecast=ms.cost.report() if forecasts else None,
    )


def models_response(engine: Engine, forecasts: bool) -> ModelsResponse:
    return ModelsResponse(
        default_model=engine.settings.default_model,
        models=[model_info(ms, forecasts) for ms in engine.registry.models.values()],
    )


def openai_model(engine: Engine, ms: ModelState) -> dict[str, Any]:
    caps = ms.capabilities
    return {
        "id": ms.name,
        "object": "model",
        "created": int(engine.started_at),
        "owned_by": "easel",
        "backend": ms.cfg.backend,
        "default": ms.name == engine.settings.default_model,
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
    engine = engine_of(request)
    data = [openai_model(engine, ms) for ms in engine.registry.models.values() if ms.state == "loaded"]
    return json_response({"object": "list", "data": data})


async def admin_models(request: Request) -> Response:
    return json_response(models_response(engine_of(request), forecasts=True))


async def admin_load(request: Request) -> Response:
    engine = engine_of(request)
    name = request.path_params["name"]
    engine.registry.get(name)  # 404 before anything starts
    if request.query_params.get("wait", "true").lower() in ("0", "false", "no"):
        engine.spawn(engine.load(name))
        await anyio.sleep(0)
    else:
        await engine.load(name)
    ms = engine.registry.get(name)
    return json_response(model_info(ms, forecasts=False), status_code=200 if ms.state != "error" else 500)


async def admin_unload(request: Request) -> Response:
    engine = engine_of(request)
    ms = await engine.unload(request.path_params["name"])
    return json_response(model_info(ms, forecasts=False))


async def gpu_memory(request: Request) -> Response:
    engine = engine_of(request)
    devices = await anyio.to_thread.run_sync(device_report)
    estimates = {
        ms.name: {"state": ms.state, "vram_estimate_mib": ms.cfg.vram_estimate_mib}
        for ms in engine.registry.models.values()
    }
    return json_response({"devices": devices, "models": estimates, "time": time.time()})


ROUTES = [
    route("/v1/models", v1_models, ["GET"], Doc("Loaded models (OpenAI shape) with capabilities", tags=("models",))),
    route("/v1/admin/models", admin_models, ["GET"], Doc("Every configured model with state, load error, queue and forecast", response=ModelsResponse, tags=("admin",), admin=True)),
    route("/v1/admin/models/{name}/load", admin_load, ["POST"], Doc("Load a model (off the event loop); ?wait=false returns at once while it loads", response=ModelInfo, tags=("admin",), params=(NAME, Param("wait", "boolean", "Wait for the load to finish (default true).")), admin=True, statuses=(404, 500))),
    route("/v1/admin/models/{name}/unload", admin_unload, ["POST"], Doc("Unload a model: queued jobs are cancelled, memory released", response=ModelInfo, tags=("admin",), params=(NAME,), admin=True, statuses=(404, 409))),
    route("/v1/admin/gpu-memory", gpu_memory, ["GET"], Doc("Per-device memory (torch, nvidia-smi, process RSS) and model estimates", tags=("admin",), admin=True)),
]
