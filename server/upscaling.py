"""Upscaling: ``upscale: 2|4`` on generate/edit jobs, and ``POST /api/upscale`` jobs.

The upscaler is an ordinary configured model (backend ``upscale_esrgan``);
``settings.upscaler`` names the one ``upscale`` uses.  It is loaded on demand:

* as post-processing (an engine image hook), after the generation model's worker
  has handed the images over, so that worker already runs the next job.  The
  upscale itself runs in a thread (``anyio.to_thread``), never on the event loop;
* for ``/api/upscale`` jobs, at submission (a load failure answers 409 at once);
  such a job then runs on the upscaler model's own queue and worker.

Every user holds a lease: while any is held the model stays loaded.  When the
last lease ends the model is unloaded unless its config says ``keep_loaded``
(the default).  Leases and loads are serialised by one lock, so concurrent jobs
never unload the upscaler under each other.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import anyio.to_thread

from .backends.base import BackendError, JobCancelled, WorkItem
from .build import load_image, parse_format, parse_priority
from .errors import BadRequest, Conflict
from .jobs import Job

if TYPE_CHECKING:
    from PIL.Image import Image

    from .backends.upscale import UpscaleBackend
    from .engine import Engine
    from .registry import ModelState
    from .schemas import UpscaleRequest
    from .worker import ImageStep

log = logging.getLogger("easel")
BACKEND = "upscale_esrgan"
LEASED = "upscaler_lease"  # job option: the job holds a lease until it ends


class Upscaler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._leases: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def install(self) -> None:
        self.engine.submit_checks.append(self.check)
        self.engine.image_hooks.append(self.image_hook)
        self.engine.done_hooks.append(self.job_done)

    def model(self, name: str | None, param: str) -> ModelState:
        """The upscaler model ``name`` (default: ``settings.upscaler``), or a 4xx."""
        name = name or self.engine.settings.upscaler
        if name is None:
            raise BadRequest(
                f"{param}: no upscaler is configured; add a model with backend {BACKEND!r} and model_path set to a "
                "Real-ESRGAN .pth/.safetensors file, and name it in the settings' top-level 'upscaler' key",
                param=param,
            )
        ms = self.engine.registry.get(name)
        if ms.cfg.backend != BACKEND:
            raise BadRequest(f"model {name!r} is not an upscaler (backend {ms.cfg.backend!r}); name a {BACKEND} model", param="model")
        return ms

    # ----- leases ------------------------------------------------------------------

    async def acquire(self, ms: ModelState) -> UpscaleBackend:
        """Load ``ms`` if needed and hold it loaded until ``release``."""
        async with self._lock:
            self._leases[ms.name] = self._leases.get(ms.name, 0) + 1
            try:
                await self.engine.load(ms.name)
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
            if self._leases[ms.name] == 0 and not ms.cfg.keep_loaded and ms.state == "loaded":
                log.info("upscaler %s: last job done, unloading (keep_loaded is false)", ms.name)
                await self.engine.unload(ms.name)

    @asynccontextmanager
    async def lease(self, ms: ModelState) -> AsyncIterator[UpscaleBackend]:
        backend = await self.acquire(ms)
        try:
            yield backend
        finally:
            await self.release(ms)

    # ----- engine hooks ------------------------------------------------------------

    async def check(self, job: Job) -> None:
        """Submit check: ``upscale`` needs an upscaler that accepts the output size."""
        if not job.options.get("upscale"):  # only generations and edits carry it (build_job)
            return
        ms = self.model(None, "upscale")
        limit = ms.cfg.max_pixels
        if any(item.width * item.height > limit for item in job.items):
            raise BadRequest(
                f"upscale: the upscaler {ms.name!r} accepts images up to {limit} pixels (models.{ms.name}.max_pixels); "
                "generate a smaller image or raise that limit",
                param="upscale",
            )

    def image_hook(self, job: Job) -> ImageStep | None:
        """Image hook: a generation asked to be upscaled gets its images upscaled
        before they are encoded."""
        scale = job.options.get("upscale")
        if not scale:
            return None
        return functools.partial(self._upscale, job, int(scale))

    async def _upscale(self, job: Job, scale: int, images: list[Image]) -> list[Image]:
        ms = self.model(None, "upscale")
        async with self.lease(ms) as backend:
            return await anyio.to_thread.run_sync(_upscale_all, backend, images, scale, job.cancel_event)

    def job_done(self, job: Job) -> Coroutine[Any, Any, None] | None:
        """Done hook: a job that held the upscaler gives its lease back."""
        if not job.options.pop(LEASED, False):
            return None
        return self.release(self.engine.registry.models[job.model])

    # ----- /api/upscale --------------------------------------------------------------

    async def submit(self, req: UpscaleRequest) -> Job:
        """Validate, load the upscaler (on demand) and queue an upscale job."""
        engine = self.engine
        ms = self.model(req.model, "model")
        image = await load_image(req.image, "image", engine.settings, engine.fetch_url)
        if image.width * image.height > ms.cfg.max_pixels:
            raise BadRequest(
                f"image: {image.width}x{image.height} is over upscaler {ms.name!r}'s max_pixels of {ms.cfg.max_pixels}; "
                "send a smaller image",
                param="image",
            )
        item = WorkItem(
            task="upscale", prompt="", width=image.width, height=image.height, steps=1, seed=0,
            images=[image], extra={"scale": req.scale},
        )
        job = Job(
            model=ms.name, task="upscale", items=[item], priority=parse_priority(req.priority),
            format=parse_format(req.format), quality=req.quality, metadata=req.metadata,
        )
        try:
            await self.acquire(ms)
        except BackendError as exc:
            raise Conflict(str(exc), param="model", code="model_not_loaded") from None
        try:
            engine.submit(ms, job)
        except BaseException:
            await self.release(ms)
            raise
        job.options[LEASED] = True
        return job


def _upscale_all(backend: UpscaleBackend, images: list[Image], scale: int, cancel: threading.Event) -> list[Image]:
    """Worker-thread side of the image hook; stops between tiles when cancelled."""

    def check(i: int, total: int) -> None:
        if cancel.is_set():
            raise JobCancelled()

    return [backend.upscale(image, scale, progress=check) for image in images]
