"""create_app(settings) -> Starlette, for the node's role:

* ``all`` (the default): the job API and the workers of the models enabled here;
* ``api``: the job API only (a shared broker's workers run the jobs);
* ``worker``: the workers only, with ``/healthz`` and ``/metrics``.

The lifespan starts the broker and the runner (loading enabled models) and stops
them on shutdown: a single process cancels what is still queued; a node of a
shared broker leaves the queue to the others."""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .broker import create_broker
from .broker.base import BrokerUnavailable
from .config import Settings
from .delivery.hooks import Delivery
from .errors import (
    ApiError,
    Forbidden,
    NotFound,
    Unauthorized,
    api_error_handler,
    broker_unavailable_handler,
    http_exception_handler,
    render,
    unhandled_error_handler,
)
from .metrics import Metrics
from .openapi import build_document
from .registry import Registry
from .routes import api, meta, models, openai, training
from .runner import Runner
from .service import Service
from .upscaling import Upscaler

log = logging.getLogger("easel")
STATIC = Path(__file__).resolve().parent.parent / "static"
ADMIN_PREFIXES = ("/v1/admin", "/api/load", "/api/train", "/v1/training")
OPEN_PATHS = ("/healthz",)


class AuthMiddleware:
    """Bearer keys: when any key is configured, /api and /v1 need one; admin
    routes need an admin key."""

    def __init__(self, app: ASGIApp, api_keys: list[str], admin_keys: list[str]) -> None:
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]
        self.admin_keys = [k.encode() for k in admin_keys]

    @staticmethod
    def _match(token: bytes, keys: list[bytes]) -> bool:
        return any(hmac.compare_digest(token, k) for k in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        admin = path.startswith(ADMIN_PREFIXES)
        guarded = path.startswith(("/api/", "/v1/")) and path not in OPEN_PATHS
        if guarded and (self.api_keys or (admin and self.admin_keys)):
            token = b""
            for name, value in scope["headers"]:
                if name == b"authorization" and value[:7].lower() == b"bearer ":
                    token = value[7:].strip()
            error: ApiError | None = None
            if admin and self.admin_keys:
                if not self._match(token, self.admin_keys):
                    error = (Forbidden if self._match(token, self.api_keys) else Unauthorized)(
                        "this endpoint needs an admin key: send Authorization: Bearer <admin key>"
                    )
            elif not (self._match(token, self.api_keys) or self._match(token, self.admin_keys)):
                error = Unauthorized("missing or invalid API key: send Authorization: Bearer <key>")
            if error is not None:
                return await render(error)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(settings: Settings, extra_routes: list[Any] | None = None) -> Starlette:
    role = settings.broker.role
    broker = create_broker(settings)
    registry = Registry(settings)
    metrics = Metrics()
    service = Service(settings, broker, registry, metrics)
    runner = Runner(settings, broker, registry, metrics) if role in ("all", "worker") else None
    service.runner = runner
    upscaler = Upscaler(settings, registry, runner)
    delivery = Delivery(settings, broker)
    service.fetch_url = delivery.fetch_url
    service.submit_checks += [upscaler.check, delivery.check]  # upscale checks before the delivery checks
    if runner is not None:
        runner.upscaler = upscaler
        runner.delivery = delivery
        runner.on_presence.append(service.forecasts.presence_changed)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broker.start()
        if runner is not None:
            await runner.start()
        log.info("easel: role %s, broker %s%s", role, broker.name, f", worker {runner.id}" if runner else "")
        try:
            yield
        finally:
            service.accepting = False
            if runner is not None:
                await runner.stop(settings.queue.shutdown_grace_seconds)
            await broker.close()

    if role == "worker":
        routes: list[Any] = [*meta.WORKER_ROUTES]
    else:
        routes = [*api.ROUTES, *models.ROUTES, *openai.ROUTES, *meta.ROUTES, *training.ROUTES, *(extra_routes or [])]
        routes.append(Mount("/swagger-static", app=StaticFiles(directory=_swagger_dir()), name="swagger-static"))
    # unknown API paths answer a JSON 404, not the static files' 405
    routes += [Route(f"/{prefix}/{{rest:path}}", _no_route, methods=ALL_METHODS) for prefix in ("api", "v1")]
    if STATIC.is_dir() and role != "worker":
        routes.append(Mount("/", app=StaticFiles(directory=STATIC, html=True), name="static"))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            BrokerUnavailable: broker_unavailable_handler,
            HTTPException: http_exception_handler,
            Exception: unhandled_error_handler,
        },
    )
    app.state.service = service
    app.state.upscaler = upscaler
    app.state.openapi = build_document(routes)
    if settings.auth.api_keys or settings.auth.admin_keys:
        app.add_middleware(AuthMiddleware, api_keys=settings.auth.api_keys, admin_keys=settings.auth.admin_keys)
    return app


ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def _no_route(request: Request) -> Response:
    raise NotFound(f"no route for {request.method} {request.url.path}; see /openapi.json for the API")


def _swagger_dir() -> str:
    import swagger_ui_bundle

    return str(swagger_ui_bundle.swagger_ui_path)
