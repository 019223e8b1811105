"""create_app(settings) -> Starlette, for the node's role:

* ``all`` (the default): the job API and the workers of the models enabled here;
* ``api``: the job API only (a shared broker's workers run the jobs);
* ``worker``: the workers only, with ``/healthz`` and ``/metrics``.

The lifespan starts the broker and the worker (loading enabled models) and stops
them on shutdown: a single process cancels what is still queued; a node of a
shared broker leaves the queue to the others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .auth import AuthMiddleware, Keys
from .bodylimit import BodyLimitMiddleware
from .broker import create_broker
from .broker.base import BrokerUnavailable
from .config import Settings
from .csp import WithCsp
from .delivery.hooks import Delivery
from .delivery.outbox import Outbox
from .delivery.outbox import stop as stop_outbox
from .errors import (
    ApiError,
    NotFound,
    api_error_handler,
    broker_unavailable_handler,
    http_exception_handler,
    unhandled_error_handler,
)
from .forwarded import ForwardedMiddleware
from .metrics import Metrics
from .openapi import build_document
from .registry import Registry
from .routes import api, meta, models, openai, sdapi, training
from .service import Service
from .textcheck import QueryCheckMiddleware
from .upscaling import Upscaler
from .worker.loop import Worker

log = logging.getLogger("easel")
HERE = Path(__file__).resolve().parent
# the web UI: server/static in an installed wheel (the repo's static/ mapped in as
# package data, see pyproject.toml), else static/ beside the package in a checkout
STATIC = next((p for p in (HERE / "static", HERE.parent / "static") if p.is_dir()), HERE.parent / "static")


def create_app(settings: Settings, extra_routes: list[Any] | None = None) -> Starlette:
    role = settings.broker.role
    broker = create_broker(settings)
    registry = Registry(settings)
    metrics = Metrics()
    keys = Keys(settings)
    delivery = Delivery(settings, broker, keys.signer)
    worker = Worker(settings, broker, registry, metrics, delivery) if role in ("all", "worker") else None
    upscaler = Upscaler(settings, registry, worker.host if worker is not None else None)
    service = Service(
        settings, broker, registry, metrics, keys, worker=worker,
        submit_checks=[upscaler.check, delivery.check],  # upscale checks before the delivery checks
        fetch_url=delivery.fetch_url,
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broker.start()
        if worker is not None:
            await worker.start()  # its heartbeat task also runs the reaper
        reaper = asyncio.create_task(service.reap_forever()) if worker is None and broker.distributed else None
        drainer = Outbox(delivery, broker).start()  # every node delivers webhooks from the outbox
        log.info("easel: role %s, broker %s%s", role, broker.name, f", worker {worker.id}" if worker else "")
        try:
            yield
        finally:
            service.accepting = False
            if reaper is not None:
                reaper.cancel()
            await stop_outbox(drainer)
            if worker is not None:
                await worker.stop(settings.queue.shutdown_grace_seconds)
            await broker.close()

    if role == "worker":
        routes: list[Any] = [*meta.WORKER_ROUTES]
    else:
        routes = [*api.ROUTES, *models.ROUTES, *openai.ROUTES, *sdapi.ROUTES, *meta.ROUTES, *training.ROUTES, *(extra_routes or [])]
        routes.append(Mount("/swagger-static", app=StaticFiles(directory=_swagger_dir()), name="swagger-static"))
    # unknown API paths answer a JSON 404, not the static files' 405
    routes += [Route(f"/{prefix}/{{rest:path}}", _no_route, methods=ALL_METHODS) for prefix in ("api", "v1", "sdapi")]
    if STATIC.is_dir() and role != "worker":
        routes.append(Mount("/", app=WithCsp(StaticFiles(directory=STATIC, html=True)), name="static"))
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
    # first added, so innermost: auth (and CORS) answer before a body is read
    app.add_middleware(BodyLimitMiddleware, limit=settings.limits.max_body_mib * 2**20)
    app.add_middleware(QueryCheckMiddleware)
    if keys.enabled:
        app.add_middleware(AuthMiddleware, keys=keys)
    if settings.http.cors_origins:
        # added last, so it wraps the auth middleware: preflights need no key, and a 401 still
        # carries the CORS headers a page needs to read it
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.http.cors_origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_HEADERS,
            expose_headers=CORS_EXPOSE,
            allow_private_network=True,
        )
    app.add_middleware(openai.RequestIdMiddleware)  # a 401 or 413 of /v1 carries it too
    if settings.http.trusted_proxies:
        app.add_middleware(ForwardedMiddleware, trusted=settings.http.trusted_proxies)  # outermost
    return app


ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
CORS_METHODS = ["GET", "HEAD", "POST", "DELETE"]
CORS_HEADERS = ["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key", "X-Request-ID"]
CORS_EXPOSE = ["X-Request-ID", "Retry-After", "Content-Disposition"]


async def _no_route(request: Request) -> Response:
    raise NotFound(f"no route for {request.method} {request.url.path}; see /openapi.json for the API")


def _swagger_dir() -> str:
    import swagger_ui_bundle

    return str(swagger_ui_bundle.swagger_ui_path)
