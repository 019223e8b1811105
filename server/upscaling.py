"""Upscaling: ``upscale: 2|4`` on generate/edit jobs, and ``POST /api/upscale`` jobs
(the service side: checks and submission).

The upscaler is an ordinary configured model (backend ``upscale_esrgan``);
``settings.upscaler`` names the one ``upscale`` uses.  It is loaded on demand by
the worker's model host, which lends it (``ModelHost.acquire`` / ``lease``):

* as post-processing (server/worker/outcome.py), after the generation model's
  worker has handed the images over, so that worker already runs the next job;
* for ``/api/upscale`` jobs, at submission on a node that runs workers (a load
  failure answers 409 at once); the job holds its lease until it ends and runs on
  the upscaler model's own queue and worker.  An API-only node (Redis broker)
  queues it for the workers that serve the upscaler.

While any lease is held the model stays loaded; after the last one it is unloaded
unless its config says ``keep_loaded`` (the default).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .allowlist import check_model
from .backends.base import BackendError
from .build import Inputs, load_image, parse_format, parse_priority
from .errors import BadRequest, Conflict
from .families import UPSCALERS
from .items import Item
from .jobs import JobRecord

if TYPE_CHECKING:
    from .auth import Caller
    from .config import Settings
    from .registry import ModelState, Registry
    from .schemas import UpscaleRequest
    from .service import Idempotency, Service
    from .worker.host import ModelHost

log = logging.getLogger("easel")


class Upscaler:
    """Submit checks and ``/api/upscale``; on a node that runs workers, the upscaler
    is lent by its model host (``host``)."""

    def __init__(self, settings: Settings, registry: Registry, host: ModelHost | None) -> None:
        self.settings = settings
        self.registry = registry
        self.host = host

    def model(self, name: str | None, param: str) -> ModelState:
        """The upscaler model ``name`` (default: ``settings.upscaler``), or a 4xx."""
        name = name or self.settings.upscaler
        if name is None:
            raise BadRequest(
                f"{param}: no upscaler is configured; add a model with backend {UPSCALERS[0]!r} and model_path set to a "
                "Real-ESRGAN .pth/.safetensors file, and name it in the settings' top-level 'upscaler' key",
                param=param,
            )
        ms = self.registry.get(name)
        if ms.cfg.backend not in UPSCALERS:
            raise BadRequest(f"model {name!r} is not an upscaler (backend {ms.cfg.backend!r}); name a {UPSCALERS[0]} model", param="model")
        return ms

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

    # ----- /api/upscale --------------------------------------------------------------

    async def submit(self, service: Service, req: UpscaleRequest, caller: Caller, idempotency: Idempotency | None) -> JobRecord:
        """Validate, load the upscaler (on demand, where this node runs workers) and
        queue an upscale job."""
        ms = self.model(req.model, "model")
        check_model(caller, ms.name)  # before the image is fetched and the upscaler loaded
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
        host = self.host
        if host is not None:  # held for the job until it ends (server/worker/outcome.py)
            try:
                await host.leases.acquire(ms.name, job.id)
            except BackendError as exc:
                raise Conflict(f"the upscaler: {exc}", param="model", code="model_not_loaded") from None
        try:
            submitted = await service.submit(job, inputs.blobs, caller, idempotency)
        except BaseException:
            if host is not None:
                await host.leases.release_job(job.id)
            raise
        if submitted is not job and host is not None:  # the same request again: the first one holds the lease
            await host.leases.release_job(job.id)
        return submitted
