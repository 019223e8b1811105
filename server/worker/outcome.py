"""How a job ends on a worker: its results post-processed (upscaled), encoded and
stored, off the model's critical path; its outcome written to the broker, fenced by
its attempt; what it cost learned by the forecast, counted in the metrics, and its
results delivered (uploads, webhook)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ..backends.base import BackendError, JobCancelled, failure_message
from ..broker.base import Broker, BrokerUnavailable
from ..features import fit_of
from ..forecast import FORGET, observation, with_after_job
from ..jobs import JobStatus
from .encode import encode_all

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..config import Settings
    from ..delivery.hooks import Delivery
    from ..metrics import Metrics
    from .context import Running
    from .host import ModelHost

log = logging.getLogger("easel")


class Outcomes:
    def __init__(self, settings: Settings, broker: Broker, metrics: Metrics, host: ModelHost, delivery: Delivery | None) -> None:
        self.settings = settings
        self.broker = broker
        self.metrics = metrics
        self.host = host
        self.delivery = delivery

    async def finish(
        self, r: Running, images: list[Image], item_seconds: list[float], worker_s: float,
        phases: tuple[float, float, float] | None, left_at: float,
    ) -> None:  # fmt: skip
        """Upscale, encode and store (the model already runs the next job), then mark
        done and learn (``left_at``: the ``time.monotonic()`` the job left the model)."""
        job = r.job
        try:
            if job.upscale:
                images = await self.upscale(images, job.upscale, r.cancel)
            results, blobs = await anyio.to_thread.run_sync(
                encode_all, job, images, item_seconds, self.settings.storage.output_dir, self.settings.storage.embed_metadata
            )
        except Exception as exc:
            if isinstance(exc, JobCancelled):
                await self.end(r, JobStatus.CANCELLED, {"message": "cancelled while post-processing"})
                return
            if not isinstance(exc, BackendError):
                log.exception("finishing job %s failed", job.id)
            await self.end(r, JobStatus.ERROR, {"message": failure_message(exc)})
            return
        fields = {"results": results, "step": job.total_steps, "worker_seconds": round(worker_s, 4), "extra": job.extra,
                  "worker_phases": [round(p, 4) for p in phases] if phases is not None else [],
                  "text_tokens": job.text_tokens, "image_tokens": job.image_tokens, "warnings": job.warnings}  # fmt: skip
        if not await self.end(r, JobStatus.DONE, fields, blobs):
            return
        stored = time.monotonic() - left_at  # from leaving the model to done: only the job itself waits for it
        if phases is not None:
            log.debug("job %s: %.3fs on the worker (%.3f before the steps, %.3f steps, %.3f after); forecast %.3fs (%s); "
                      "stored in %.3fs%s", job.id, worker_s, *phases, job.predicted, ", ".join(f"{p:.3f}" for p in job.predicted_phases),
                      stored, ("; right after another job" if r.after_job else "") + ("; the first since the model loaded" if r.first_call else ""))  # fmt: skip
        await self.learn(r, worker_s, phases, stored)
        if self.delivery is not None and (job.upload_urls or job.webhook_url):
            await self.delivery.deliver(job)

    async def upscale(self, images: list[Image], scale: int, cancel: threading.Event) -> list[Image]:
        """A generation that asked for ``upscale``: the upscaler (``settings.upscaler``),
        leased from the model host for the time it takes."""
        name = self.settings.upscaler
        if name is None:  # checked at submission; the settings changed since
            raise BackendError("upscale: no upscaler is configured on this worker")
        async with self.host.leases.lease(name) as backend:
            return await anyio.to_thread.run_sync(_upscale_all, backend, images, scale, cancel)

    async def learn(self, r: Running, worker_s: float, phases: tuple[float, float, float] | None, stored: float) -> None:
        job = r.job
        if r.learn_as is not None:  # a batch's one call (its features, seconds and phases), taught by its lead job
            feats = with_after_job(r.learn_as[0], r.after_job, r.first_call)
            decayed, added = observation(feats, r.learn_as[1], None, r.learn_as[2])
        else:
            feats = with_after_job(job.features, r.after_job, r.first_call)
            decayed, added = observation(feats, worker_s, job.predicted, phases, stored)
        if r.learns:
            await self.broker.observe_cost(job.model, fit_of(job.task), decayed, added, FORGET)
        self.metrics.duration.labels(job.model, job.task).observe(worker_s)
        total = (job.finished_at or time.time()) - job.created_at
        if total > 0:
            self.metrics.forecast_error.labels(job.model).observe(abs(job.expected_at_submit - total) / total)

    async def end(self, r: Running, status: JobStatus, fields: dict[str, Any], blobs: dict[str, bytes] | None = None) -> bool:
        """Finish the attempt in the broker; False when it was refused (the lease was lost)."""
        job = r.job
        if "extra" not in fields and job.extra:
            fields["extra"] = job.extra
        await self.host.leases.release_job(job.id)  # an /api/upscale job gives the upscaler back before it reads as done
        try:
            ok = await self.broker.finish(job, status, fields, attempt=r.attempt, blobs=blobs or {})
        except BrokerUnavailable as exc:
            log.error("job %s: could not store its outcome (%s); its lease will expire and it runs again", job.id, exc)
            return False
        if not ok:
            log.warning("job %s: result of attempt %d rejected: the job was lost to another worker or cancelled", job.id, r.attempt)
            return False
        self.metrics.jobs.labels(job.model, job.task, status.value).inc()
        used = fields.get("worker_seconds", time.time() - job.started_at if job.started_at else 0.0)
        self.metrics.gpu_seconds.labels(job.owner or "anonymous", job.model).inc(max(0.0, used))
        took = f" in {time.time() - (job.started_at or time.time()):.2f}s" if job.started_at else ""
        message = fields.get("message")
        log.info("job %s on %s: %s%s%s", job.id, job.model, status.value, took, f" ({message})" if message else "")
        return True

    async def release(self, r: Running) -> None:
        """Back to the shared queue (the worker is stopping)."""
        try:
            if await self.broker.release(r.job, r.attempt):
                log.info("job %s on %s: released back to the queue (the worker is stopping)", r.job.id, r.job.model)
        except BrokerUnavailable as exc:
            log.error("job %s: could not be released (%s); its lease will expire and it runs again", r.job.id, exc)


def _upscale_all(backend: Any, images: list[Image], scale: int, cancel: threading.Event) -> list[Image]:
    """On a thread: every image upscaled; stops between tiles when cancelled."""

    def check(i: int, total: int) -> None:
        if cancel.is_set():
            raise JobCancelled()

    return [backend.upscale(image, scale, progress=check) for image in images]
