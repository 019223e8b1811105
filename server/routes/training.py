"""LoRA training routes: POST /api/train, GET /api/loras, and image-pool's
/v1/training/{flux-lora,z-image-lora} (+ /stop), all over the same "train" jobs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..allowlist import check_model, may_use_lora
from ..auth import Caller, caller_of
from ..errors import BadRequest, NotFound
from ..families import FAMILIES
from ..jobs import JobRecord, JobStatus
from ..openapi import Doc, Param, route
from ..schemas import SubmitResponse
from ..schemas_training import (
    LoraInfo,
    LorasResponse,
    SeedTrainRequest,
    StopTrainingRequest,
    TrainingRun,
    TrainingRunsResponse,
    TrainRequest,
)
from ..service import Service
from ..standing import standing
from ..training.adapters import list_adapters
from ..training.submit import build_train_job, training_jobs
from .common import decode, json_response, read_body, service_of

STOP_WAIT_SECONDS = 60.0  # a stopped run saves its checkpoint before it ends
ENDPOINT_BACKENDS = {f.trainable: f.key for f in FAMILIES.values() if f.trainable}  # /v1/training/<endpoint>


async def queue_training(service: Service, req: TrainRequest, caller: Caller) -> JobRecord:
    job = await build_train_job(service, req)
    return await service.submit(job, {}, caller)


async def train(request: Request) -> Response:
    service = service_of(request)
    job = await queue_training(service, decode(await read_body(request), TrainRequest, service_of(request).settings.limits), caller_of(request.scope))
    return json_response(
        SubmitResponse(
            task_id=job.id,
            task_length=0,
            expected_time_seconds=round(job.expected_at_submit, 3),
            pos=job.pos_at_submit,
            status=job.status.value,
            seed=job.extra.get("seed"),
        )
    )


async def loras(request: Request) -> Response:
    ms = service_of(request).model(request.query_params.get("model"))
    caller = caller_of(request.scope)
    check_model(caller, ms.name)
    lora_dir = ms.cfg.lora_dir
    found = [a for a in list_adapters(lora_dir) if may_use_lora(caller, a[0])] if lora_dir else []
    return json_response(
        LorasResponse(
            model=ms.name,
            lora_dir=lora_dir,
            loras=[LoraInfo(name=name, path=str(path), metadata=meta) for name, path, meta in found],
        )
    )


# ----------------------------------------------------------------- image-pool shape


async def run_of(service: Service, job: JobRecord) -> TrainingRun:
    plan = job.train
    assert plan is not None
    wait = (await standing(service.forecasts, job)).wait
    return TrainingRun(
        task_id=job.id,
        model=job.model,
        adapter_name=plan.adapter_name,
        output_dir=str(plan.output),
        status=job.status.value,  # type: ignore[arg-type]
        step=max(job.step, job.extra.get("step", 0)),  # a stopped run's last step is not reported as progress
        total_steps=job.total_steps,
        progress=round(job.progress, 4),
        loss=job.extra.get("loss"),
        loss_avg=job.extra.get("loss_avg"),
        checkpoint_step=job.extra.get("checkpoint_step"),
        wait_remaining=round(wait, 3) if wait is not None else 0.0,
        message=job.message,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


async def _runs(service: Service, backend: str) -> TrainingRunsResponse:
    jobs = await training_jobs(service, backend)
    active = next((j for j in jobs if j.status is JobStatus.RUNNING), None)
    return TrainingRunsResponse(
        runs=[await run_of(service, j) for j in jobs],
        active=await run_of(service, active) if active is not None else None,
    )


async def _default_model(service: Service, backend: str) -> str:
    for ms in service.models():
        if ms.cfg.backend == backend and (await service.model_state(ms))[0] == "loaded":
            return ms.name
    raise NotFound(f"no {backend} model is loaded; load one or name it in model", param="model")


def _adapter_name(service: Service, model: str, output_dir: str) -> str:
    """``output_dir`` as an adapter name: a bare name, or a folder directly inside
    the model's lora_dir."""
    if "/" not in output_dir and "\\" not in output_dir:
        return output_dir
    lora_dir = service.model(model).cfg.lora_dir
    path = Path(output_dir).expanduser().resolve()
    if lora_dir is None or path.parent != Path(lora_dir).expanduser().resolve():
        raise BadRequest(
            f"output_dir {output_dir!r} must be a folder directly inside model {model!r}'s lora_dir "
            f"({lora_dir or 'not configured'}), or a bare adapter name",
            param="output_dir",
        )
    return path.name


async def seed_request(service: Service, backend: str, req: SeedTrainRequest) -> TrainRequest:
    model = req.model or await _default_model(service, backend)
    if service.model(model).cfg.backend != backend:
        raise BadRequest(f"model {model!r} is not a {backend} model; use the matching /v1/training endpoint", param="model")
    return decode(
        {
            "model": model,
            "dataset_dir": req.dataset_dir,
            "adapter_name": _adapter_name(service, model, req.output_dir),
            "steps": req.max_train_steps,
            "rank": req.rank,
            "alpha": req.lora_alpha,
            "learning_rate": req.learning_rate,
            "batch_size": req.train_batch_size,
            "resolution": req.resolution,
            "seed": req.seed,
            "save_every": req.checkpointing_steps,
            "gradient_checkpointing": req.gradient_checkpointing,
            "overwrite": req.overwrite,
        },
        TrainRequest,
    )


Handler = Callable[[Request], Awaitable[Response]]


def training_endpoints(endpoint: str) -> tuple[Handler, Handler, Handler]:
    """(list runs, start a run, stop runs) for one image-pool endpoint."""
    backend = ENDPOINT_BACKENDS[endpoint]

    async def runs(request: Request) -> Response:
        return json_response(await _runs(service_of(request), backend))

    async def start(request: Request) -> Response:
        service = service_of(request)
        req = decode(await read_body(request), SeedTrainRequest, service.settings.limits)
        job = await queue_training(service, await seed_request(service, backend, req), caller_of(request.scope))
        return json_response(await run_of(service, job))

    async def stop(request: Request) -> Response:
        service = service_of(request)
        body = await read_body(request)
        task_id = decode(body, StopTrainingRequest, service.settings.limits).task_id if body.strip() else None
        task_id = task_id or request.query_params.get("task_id")
        jobs = [j for j in await training_jobs(service, backend) if not j.status.finished and task_id in (None, j.id)]
        if task_id is not None and not jobs:
            raise NotFound(f"no unfinished {endpoint} run has task_id {task_id!r}", param="task_id")
        for job in jobs:
            await service.cancel(job)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        for job in jobs:
            await service.wait_while(job, lambda j: not j.status.finished, deadline)
        return json_response(await _runs(service, backend))

    return runs, start, stop


def _routes() -> list[Any]:
    out = [
        route("/api/train", train, ["POST"], Doc("Queue a LoRA training job", body=TrainRequest, response=SubmitResponse, tags=("training",), admin=True, statuses=(400, 403, 404, 409, 429))),
        route("/api/loras", loras, ["GET"], Doc("LoRA adapters in a model's lora_dir, with training metadata", response=LorasResponse, tags=("training",), params=(Param("model", description="Model name; default: the default model."),))),
    ]  # fmt: skip
    for endpoint in ENDPOINT_BACKENDS:
        runs, start, stop = training_endpoints(endpoint)
        path = f"/v1/training/{endpoint}"
        out.append(route(path, runs, ["GET"], Doc(f"{endpoint} training runs with status, step and loss", response=TrainingRunsResponse, tags=("training",), admin=True)))  # fmt: skip
        out.append(route(path, start, ["POST"], Doc(f"Start a {endpoint} run (image-pool fields)", body=SeedTrainRequest, response=TrainingRun, tags=("training",), admin=True, statuses=(400, 403, 404, 409, 429))))  # fmt: skip
        out.append(route(f"{path}/stop", stop, ["POST"], Doc(f"Stop {endpoint} runs gracefully (each saves a checkpoint)", body=StopTrainingRequest, response=TrainingRunsResponse, tags=("training",), admin=True)))  # fmt: skip
    return out


ROUTES = _routes()
