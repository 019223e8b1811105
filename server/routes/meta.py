"""Health, metrics, the OpenAPI document and the Swagger page (served offline)."""

from __future__ import annotations

import time

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ..auth import caller_of
from ..openapi import Doc, route
from ..readiness import readiness
from ..registry import device_report
from ..schemas import HealthResponse, Healthz, Readiness
from .common import json_response, service_of
from .models import models_response

SWAGGER_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>easel API</title>
<link rel="stylesheet" href="/swagger-static/swagger-ui.css">
<link rel="icon" href="/swagger-static/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger-static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


async def healthz(request: Request) -> Response:
    return json_response(Healthz(status="ok"))


async def readyz(request: Request) -> Response:
    ready = await readiness(service_of(request))
    return json_response(ready, status_code=200 if ready.status == "ready" else 503, headers={"Cache-Control": "no-store"})


async def health(request: Request) -> Response:
    service = service_of(request)
    devices = await anyio.to_thread.run_sync(device_report)
    models = (await models_response(service, forecasts=True)).models
    ok = service.accepting and not any(m.state == "error" for m in models)
    return json_response(
        HealthResponse(
            status="ok" if ok else ("shutting_down" if not service.accepting else "degraded"),
            models=models,
            devices=devices,
            uptime_seconds=round(time.time() - service.started_at, 1),
            broker=service.broker.name,
            role=service.settings.broker.role,
        )
    )


async def metrics(request: Request) -> Response:
    service = service_of(request)
    caller = caller_of(request.scope)
    body = service.metrics.render(await service.depths(), key_ids=not service.keys.enabled or caller.key_id is not None)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi_json(request: Request) -> Response:
    return json_response(request.app.state.openapi)


async def swagger(request: Request) -> Response:
    return HTMLResponse(SWAGGER_HTML)


async def docs(request: Request) -> Response:
    return RedirectResponse("/swagger")


ROUTES = [
    route("/healthz", healthz, ["GET"], Doc("Liveness: the process answers", response=Healthz, tags=("meta",), statuses=())),
    route("/readyz", readyz, ["GET"], Doc("Readiness: the broker answers and (nodes with workers) the enabled models are loaded; 503 otherwise", response=Readiness, tags=("meta",), statuses=())),
    route("/health", health, ["GET"], Doc("Models, devices, memory and learned forecasts", response=HealthResponse, tags=("meta",), statuses=())),
    route("/metrics", metrics, ["GET"], Doc("Prometheus metrics", content="text/plain", tags=("meta",), statuses=())),
    route("/openapi.json", openapi_json, ["GET"], Doc("This document", tags=("meta",), statuses=())),
    route("/swagger", swagger, ["GET"], Doc("Swagger UI", content="text/html", tags=("meta",), statuses=())),
    route("/docs", docs, ["GET"], Doc("Redirect to /swagger", content="text/html", tags=("meta",), statuses=())),
]
# a worker node (role worker) serves no job API: liveness, readiness, health and metrics only
WORKER_ROUTES = ROUTES[:4]
