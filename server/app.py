"""create_app(settings) -> Starlette.  The lifespan starts the engine (loading
enabled models and their workers) and drains it on shutdown."""

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

from .config import Settings
from .delivery.hooks import install as install_delivery
from .engine import Engine
from .errors import (
    ApiError,
    Forbidden,
    NotFound,
    Unauthorized,
    api_error_handler,
    http_exception_handler,
    render,
    unhandled_error_handler,
)
from .openapi import build_document
from .routes import api, meta, models, openai, training
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
    engine = Engine(settings)
    upscaler = Upscaler(engine)
    upscaler.install()  # upscale checks and post-processing before the delivery checks
    install_delivery(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown(settings.queue.shutdown_grace_seconds)

    routes: list[Any] = [*api.ROUTES, *models.ROUTES, *openai.ROUTES, *meta.ROUTES, *training.ROUTES, *(extra_routes or [])]
    routes.append(Mount("/swagger-static", app=StaticFiles(directory=_swagger_dir()), name="swagger-static"))
    # unknown API paths answer a JSON 404, not the static files' 405
    routes += [Route(f"/{prefix}/{{rest:path}}", _no_route, methods=ALL_METHODS) for prefix in ("api", "v1")]
    if STATIC.is_dir():
        routes.append(Mount("/", app=StaticFiles(directory=STATIC, html=True), name="static"))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_exception_handler,
            Exception: unhandled_error_handler,
        },
    )
    app.state.engine = engine
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
