"""Upscaling: ``upscale: 2|4`` on generate/edit jobs, and ``POST /api/upscale`` jobs.

The upscaler is an ordinary configured model (backend ``upscale_esrgan``);
``settings.upscaler`` names the one ``upscale`` uses.  It is loaded on demand:

* as post-processing (a step of the runner), after the generation model's worker
  has handed the images over, so that worker already runs the next job.  The
  upscale itself runs in a thread (``anyio.to_thread``), never on the event loop;
* for ``/api/upscale`` jobs, at submission on a node that runs workers (a load
  failure answers 409 at once); such a job then runs on the upscaler model's own
  queue and worker.  An API-only node (Redis broker) queues it for the workers
  that serve the upscaler.

Every user holds a lease: while any is held the model stays loaded.  When the
last lease ends the model is unloaded unless its config says ``keep_loaded``
(the default).  Leases and loads are serialised by one lock, so concurrent jobs
never unload the upscaler under each other.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, cast

import anyio.to_thread

from .backends.base import BackendError, JobCancelled
from .build import Inputs, load_image, parse_format, parse_priority
from .errors import BadRequest, Conflict
from .jobs import Item, JobRecord

if TYPE_CHECKING:
    from PIL.Image import Image

    from .auth import Caller
    from .backends.upscale import UpscaleBackend
    from .config import Settings
    from .registry import ModelState, Registry
    from .runner import Runner
    from .schemas import UpscaleRequest
    from .service import Idempotency, Service

log = logging.getLogger("easel")
BACKEND = "upscale_esrgan"


class Upscaler:
    """Submit checks and ``/api/upscale`` (service side), and the upscaler's leases on
    the models of this process (runner side, when there is one)."""

    def __init__(self, settings: Settings, registry: Registry, runner: Runner | None) -> None:
        self.settings = settings
        self.registry = registry
        self.runner = runner
        self._leases: dict[str, int] = {}
        self._leased_jobs: set[str] = set()  # /api/upscale jobs holding a lease until they end
        self._lock = asyncio.Lock()

    def model(self, name: str | None, param: str) -> ModelState:
        """The upscaler model ``name`` (default: ``settings.upscaler``), or a 4xx."""
        name = name or self.settings.upscaler
        if name is None:
            raise BadRequest(
                f"{param}: no upscaler is configured; add a model with backend {BACKEND!r} and model_path set to a "
                "Real-ESRGAN .pth/.safetensors file, and name it in the settings' top-level 'upscaler' key",
                param=param,
            )
        ms = self.registry.get(name)
        if ms.cfg.backend != BACKEND:
            raise BadRequest(f"model {name!r} is not an upscaler (backend {ms.cfg.backend!r}); name a {BACKEND} model", param="model")
        return ms

    # ----- leases ------------------------------------------------------------------

    async def acquire(self, ms: ModelState) -> UpscaleBackend:
        """Load ``ms`` here if needed and hold it loaded until ``release``."""
        if self.runner is None:
            raise BackendError(f"the upscaler {ms.name!r} cannot be loaded on this node (it runs no workers)")
        async with self._lock:
            self._leases[ms.name] = self._leases.get(ms.name, 0) + 1
            try:
                await self.runner.load(ms.name)
                while ms.state == "loading":  # a load started elsewhere (admin API) is finishing
                    await asyncio.sleep(0.05)
                if ms.state != "loaded" or ms.backend is None:
                    raise BackendError(f"the upscaler {ms.name!r} could not be loaded: {ms.load_error or ms.state}")
            except BaseException:
                self._leases[ms.name] -= 1
                raise
            return cast("UpscaleBackend", ms.backend)

    async def release(self, ms: ModelState) -> None:
        async with self._lock:
            self._leases[ms.name] -= 1
            if self._leases[ms.name] == 0 and not ms.cfg.keep_loaded and ms.state == "loaded" and self.runner is not None:
                log.info("upscaler %s: last job done, unloading (keep_loaded is false)", ms.name)
                await self.runner.unload(ms.name)

    @asynccontextmanager
    async def lease(self, ms: ModelState) -> AsyncIterator[UpscaleBackend]:
        backend = await self.acquire(ms)
        try:
            yield backend
        finally:
            await self.release(ms)

    # ----- the job path ------------------------------------------------------------

    async def check(self, job: JobRecord) -> None:
        """Submit check: ``upscale`` needs an upscaler that accepts the output size."""
        if not job.upscale:  # only generations and edits carry it (build_job)
            return
        ms = self.model(None, "upscale")
        limit = ms.cfg.max_pixels
        if any(item.width * item.height > limit for item in job.items):
            raise BadRequest(
                f"upscale: the upscaler {ms.name!r} accepts images up to {limit} pixels (models.{ms.name}.max_pixels); "
                "generate a smaller image or raise that limit",
                param="upscale",
            )

    async def upscale(self, images: list[Image], scale: int, cancel: threading.Event) -> list[Image]:
        """The runner's upscale step for a generation that asked for ``upscale``."""
        ms = self.model(None, "upscale")
        async with self.lease(ms) as backend:
            return await anyio.to_thread.run_sync(_upscale_all, backend, images, scale, cancel)

    async def job_done(self, job: JobRecord) -> None:
        """A job that held the upscaler gives its lease back."""
        if job.id in self._leased_jobs:
            self._leased_jobs.discard(job.id)
            await self.release(self.registry.get(job.model))

    # ----- /api/upscale --------------------------------------------------------------

    async def submit(self, service: Service, req: UpscaleRequest, caller: Caller, idempotency: Idempotency | None) -> JobRecord:
        """Validate, load the upscaler (on demand, where this node runs workers) and
        queue an upscale job."""
        ms = self.model(req.model, "model")
        data, image = await load_image(req.image, "image", self.settings, service.fetch_url)
        if image.width * image.height > ms.cfg.max_pixels:
            raise BadRequest(
                f"image: {image.width}x{image.height} is over upscaler {ms.name!r}'s max_pixels of {ms.cfg.max_pixels}; "
                "send a smaller image",
                param="image",
            )
        inputs = Inputs(job_id=None)
        key = inputs.add("image", data)
        item = Item(prompt="", width=image.width, height=image.height, steps=1, seed=0, images=[key], scale=req.scale)
        job = JobRecord(
            id=inputs.job_id, model=ms.name, task="upscale", items=[item], priority=parse_priority(req.priority),
            format=parse_format(req.format), quality=req.quality, metadata=req.metadata, inputs=[key],
        )  # fmt: skip
        leased = self.runner is not None
        if leased:
            try:
                await self.acquire(ms)
            except BackendError as exc:
                raise Conflict(str(exc), param="model", code="model_not_loaded") from None
            self._leased_jobs.add(job.id)
        try:
            submitted = await service.submit(job, inputs.blobs, caller, idempotency)
        except BaseException:
            if leased:
                self._leased_jobs.discard(job.id)
                await self.release(ms)
            raise
        if submitted is not job and leased:  # the same request again: the first one holds the lease
            self._leased_jobs.discard(job.id)
            await self.release(ms)
        return submitted


def _upscale_all(backend: UpscaleBackend, images: list[Image], scale: int, cancel: threading.Event) -> list[Image]:
    """Worker-thread side of the image hook; stops between tiles when cancelled."""

    def check(i: int, total: int) -> None:
        if cancel.is_set():
            raise JobCancelled()

    return [backend.upscale(image, scale, progress=check) for image in images]
