"""The service layer: what routes call (submit, status, wait, cancel, list, fetch,
models).  It talks to the broker and to nothing below it; on a node that also runs
workers (role ``all``) it asks the local runner to load models on demand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from .broker.base import Broker, BrokerUnavailable, QueueFullError, WorkerInfo
from .errors import Conflict, Gone, NotFound, QueueFull, Unavailable
from .forecast import features, sum_features
from .jobs import ImageResult, JobRecord, JobStatus, preview_key, result_key
from .registry import ModelState, Registry
from .standing import Forecasts, Where, predict, queue_seconds, standing

if TYPE_CHECKING:
    from .build import UrlFetcher
    from .config import Settings
    from .metrics import Metrics
    from .runner import Runner

log = logging.getLogger("easel")
SubmitCheck = Callable[[JobRecord], Coroutine[Any, Any, None]]


@dataclass
class ModelStatus:
    state: str  # across the workers that serve the model
    load_error: str | None
    waiting: int
    running: int
    workers: list[WorkerInfo]


class Service:
    def __init__(self, settings: Settings, broker: Broker, registry: Registry, metrics: Metrics) -> None:
        self.settings = settings
        self.broker = broker
        self.registry = registry  # configured models (loaded only where a runner is)
        self.metrics = metrics
        self.forecasts = Forecasts(settings, broker)
        self.runner: Runner | None = None  # the workers of this process, if any (role all)
        self.submit_checks: list[SubmitCheck] = []  # before a job is queued (URL guards, upscaler...)
        self.fetch_url: UrlFetcher | None = None  # reference images given by URL
        self.accepting = True
        self.started_at = time.time()

    # ----- models ----------------------------------------------------------------------

    def model(self, name: str | None) -> ModelState:
        """A configured model (404 for an unknown name)."""
        return self.registry.get(name)

    def models(self) -> list[ModelState]:
        """Every configured model."""
        return list(self.registry.models.values())

    async def forecast_report(self, ms: ModelState) -> dict[str, dict[str, object]]:
        """What the model's forecast has learned, per task (for /api/ps and /health)."""
        return (await self.forecasts.cost(ms.name)).report()

    async def model_state(self, ms: ModelState) -> tuple[str, str | None, int]:
        """(state, load error, live slots) of a model across the workers serving it."""
        if self.runner is not None and not self.broker.distributed:  # one process: its registry is the truth
            return ms.state, ms.load_error, ms.cfg.target_inflight if ms.state == "loaded" else 0
        infos = await self.forecasts.workers(ms.name)
        if not infos:
            return "unloaded", None, 0
        states = {w.state for w in infos}
        slots = sum(w.slots for w in infos if w.state == "loaded")
        for state in ("loaded", "loading", "error"):
            if state in states:
                error = next((w.load_error for w in infos if w.load_error), None)
                return state, error if state == "error" else None, slots
        return "unloaded", None, 0

    async def model_status(self, ms: ModelState) -> ModelStatus:
        state, error, _ = await self.model_state(ms)
        waiting, running = await self.broker.depth(ms.name)
        return ModelStatus(state, error, waiting, running, await self.forecasts.workers(ms.name))

    async def served_model(self, name: str | None) -> ModelState:
        """A model jobs may be queued for: loaded here, or (distributed) configured;
        a 409 otherwise."""
        ms = self.model(name)
        if self.broker.distributed:
            return ms  # workers may come later: the queue survives until one does
        state, error, _ = await self.model_state(ms)
        if state != "loaded":
            hint = f": {error}" if state == "error" else ""
            raise Conflict(
                f"model {ms.name!r} is {state}{hint}; load it with POST /v1/admin/models/{ms.name}/load",
                param="model",
                code="model_not_loaded",
            )
        return ms

    async def load(self, name: str) -> None:
        ms = self.model(name)
        if self.runner is not None:
            await self.runner.load(ms.name)
        else:
            await self.broker.command(ms.name, "load")
        self.forecasts.presence_changed(ms.name)

    async def unload(self, name: str) -> None:
        ms = self.model(name)
        if self.runner is not None:
            await self.runner.unload(ms.name)
        else:
            await self.broker.command(ms.name, "unload")
        self.forecasts.presence_changed(ms.name)

    # ----- submit ----------------------------------------------------------------------

    async def submit(self, job: JobRecord, blobs: dict[str, bytes]) -> JobRecord:
        """Checks, forecast, then into the broker's queue; ``job`` gets its standing."""
        if not self.accepting:
            raise Unavailable("the server is shutting down and accepts no new jobs")
        for check in self.submit_checks:
            await check(job)
        if not job.features:  # training jobs bring their own
            job.features = sum_features(
                [features(it.steps, it.megapixels, it.n, len(it.images)) for it in job.items]
            ).tolist()
        if job.total_steps == 0:
            job.total_steps = sum(it.steps for it in job.items)
        cost = await self.forecasts.cost(job.model)
        job.predicted = predict(cost, job)
        try:
            await self.broker.submit(job, blobs, self.settings.queue.capacity)
        except QueueFullError:
            raise QueueFull(
                f"the queue of model {job.model!r} is full ({self.settings.queue.capacity} jobs); retry later",
                retry_after=await queue_seconds(self.forecasts, job.model),
            ) from None
        where = await standing(self.forecasts, job)
        await self.broker.update(job, {"pos_at_submit": where.pos, "expected_at_submit": where.wait or 0.0})
        self.metrics.submitted.labels(job.model, job.task).inc()
        log.info(
            "job %s %s on %s: waiting (pos %d, expected %s, priority %d)",
            job.id, job.task, job.model, where.pos,
            f"{where.wait:.2f}s" if where.wait is not None else "unknown: no worker", job.priority,
        )
        return job

    # ----- reading -----------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord:
        job = await self.broker.get(job_id)
        if job is None:
            raise NotFound(
                f"unknown task_id {job_id!r} (finished jobs are kept for {self.settings.queue.result_ttl_seconds:.0f}s)",
                param="task_id",
            )
        return job

    async def where(self, job: JobRecord) -> Where:
        return await standing(self.forecasts, job)

    async def wait_while(self, job: JobRecord, busy: Callable[[JobRecord], bool], deadline: float) -> JobRecord:
        """Wait through status changes while ``busy(job)`` holds, until ``deadline``
        (``time.monotonic()``); returns the record as it then stands."""
        while busy(job) and (left := deadline - time.monotonic()) > 0:
            await self.broker.wait_change(job.id, left, progress=False)
            job = await self.get(job.id)
        return job

    async def wait_change(self, job: JobRecord, timeout: float | None, *, progress: bool = True) -> tuple[JobRecord, bool]:
        changed = await self.broker.wait_change(job.id, timeout, progress=progress)
        return (await self.get(job.id) if changed else job), changed

    async def image(self, job: JobRecord, index: int, *, delete: bool) -> tuple[ImageResult, bytes]:
        """A done job's image bytes (410 once fetched with delete=true, or expired)."""
        if not 0 <= index < len(job.results):
            raise NotFound(f"index {index} is out of range; task {job.id} has {len(job.results)} image(s)", param="index")
        result = job.results[index]
        data = None if result.gone else await self.broker.get_blob(result_key(job.id, index))
        if data is None:
            raise Gone(f"image {index} of task {job.id} was already fetched with delete=true or expired", param="index")
        if delete:
            await self.broker.delete_blob(result_key(job.id, index))
            results = list(job.results)
            results[index] = msgspec.structs.replace(result, gone="fetched with delete=true")
            await self.broker.update(job, {"results": results})
        return result, data

    async def preview(self, job: JobRecord, index: int) -> bytes | None:
        """Partial image ``index`` of a running job (OpenAI ``partial_images``)."""
        return await self.broker.get_blob(preview_key(job.id, index))

    async def queue(self, limit: int) -> list[JobRecord]:
        """Running then waiting jobs of every model, in run order."""
        out: list[JobRecord] = []
        for name in self.registry.models:
            out.extend(await self.broker.running(name))
            out.extend(await self.broker.waiting(name, limit))
        return out

    async def recent(self, limit: int) -> list[JobRecord]:
        return await self.broker.recent(limit)

    # ----- cancel --------------------------------------------------------------------------

    async def cancel(self, job: JobRecord) -> JobRecord:
        out = await self.broker.cancel(job.id, "cancelled before it ran") or job
        if job.status is JobStatus.WAITING and out.status is JobStatus.CANCELLED:
            log.info("job %s on %s: cancelled (%s)", job.id, job.model, out.message)
        return out

    async def clear(self) -> int:
        return await self.broker.clear("cancelled by /api/clear")

    async def depths(self) -> dict[str, tuple[int, int]]:
        out = {}
        for name in self.registry.models:
            try:
                out[name] = await self.broker.depth(name)
            except BrokerUnavailable:
                out[name] = (0, 0)
        return out

