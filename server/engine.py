"""The engine: submit, cancel, status and forecasts over the registry's queues.

Routes call the engine; the engine owns the job store, the per-model queues and
worker loops, and the forecasts.  Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .build import UrlFetcher
from .errors import Conflict, NotFound, QueueFull, Unavailable
from .forecast import DIM, features, job_vector, running_remaining, sum_features
from .jobs import Job, JobStatus
from .metrics import Metrics
from .registry import ModelState, Registry
from .store import JobStore
from .threads import LoopThreads
from .worker import ImageHook, worker_loop

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("easel")
# a done hook looks at a finished job and returns the work to run for it, if any
DoneHook = Callable[[Job], Coroutine[Any, Any, None] | None]
SubmitCheck = Callable[[Job], Coroutine[Any, Any, None]]


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings)
        self.store = JobStore(settings.queue.result_ttl_seconds, settings.queue.result_memory_mib * 2**20)
        self.metrics = Metrics(self._depths)
        self.image_hooks: list[ImageHook] = []  # before encoding (upscale...)
        self.done_hooks: list[DoneHook] = []  # after a job ends (uploads, webhooks, upscaler lease)
        self.submit_checks: list[SubmitCheck] = []  # before a job is queued (URL guards...)
        self.fetch_url: UrlFetcher | None = None  # reference images given by URL
        self.encoder = LoopThreads(2, "easel-encode")  # off the GPU threads
        self.accepting = True
        self.started_at = time.time()
        self._seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._janitor_task: asyncio.Task[None] | None = None

    # ----- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        for name, cfg in self.settings.models.items():
            if cfg.enabled:
                await self.load(name)
        self._janitor_task = asyncio.create_task(self._janitor())

    async def load(self, name: str) -> ModelState:
        ms = await self.registry.load(name)
        if ms.state == "loaded" and not ms.workers:
            ms.queue._closed = False
            ms.workers = [asyncio.create_task(worker_loop(self, ms)) for _ in range(ms.cfg.target_inflight)]
            self.metrics.loaded.labels(name).set(1)
        return ms

    async def unload(self, name: str) -> ModelState:
        ms = self.registry.get(name)
        for job in ms.queue.drain():
            self.finish(ms, job, JobStatus.CANCELLED, f"model {name!r} was unloaded before the job ran")
        ms.queue.close()
        for job in list(ms.running):
            job.cancel_event.set()
        await asyncio.gather(*ms.workers, return_exceptions=True)
        ms.workers = []
        self.metrics.loaded.labels(name).set(0)
        return await self.registry.unload(name)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let running jobs finish within ``grace`` seconds, then
        cancel what is left."""
        self.accepting = False
        if self._janitor_task is not None:
            self._janitor_task.cancel()
        for ms in self.registry.models.values():
            for job in ms.queue.drain():
                self.finish(ms, job, JobStatus.CANCELLED, "the server shut down before the job ran")
            ms.queue.close()
        workers = [w for ms in self.registry.models.values() for w in ms.workers]
        if workers:
            done, pending = await asyncio.wait(workers, timeout=grace)
            if pending:
                log.warning("shutdown: grace period over, cancelling %d running job(s)", len(pending))
                for ms in self.registry.models.values():
                    for job in ms.running:
                        job.cancel_event.set()
                await asyncio.wait(pending, timeout=30)
        pending_tasks = [t for t in self._tasks if not t.done()]
        if pending_tasks:
            await asyncio.wait(pending_tasks, timeout=5)
        for ms in self.registry.models.values():
            if ms.backend is not None:
                await self.registry.unload(ms.name)
        self.encoder.shutdown()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.settings.queue.result_ttl_seconds / 4))
            self.store.evict()

    # ----- submit / cancel ---------------------------------------------------------

    async def run_submit_checks(self, job: Job) -> None:
        for check in self.submit_checks:
            await check(job)

    def loaded_model(self, name: str | None) -> ModelState:
        ms = self.registry.get(name)
        if ms.state != "loaded":
            hint = f": {ms.load_error}" if ms.state == "error" else ""
            raise Conflict(
                f"model {ms.name!r} is {ms.state}{hint}; load it with POST /v1/admin/models/{ms.name}/load",
                param="model",
                code="model_not_loaded",
            )
        return ms

    def submit(self, ms: ModelState, job: Job) -> Job:
        if not self.accepting:
            raise Unavailable("the server is shutting down and accepts no new jobs")
        if ms.queue.full:
            raise QueueFull(
                f"the queue of model {ms.name!r} is full ({ms.queue.capacity} jobs); retry later",
                retry_after=self._queue_seconds(ms),
            )
        self._seq += 1
        job.seq = self._seq
        if job.features is None:  # training jobs bring their own
            job.features = sum_features([features(it.steps, it.megapixels, it.n, len(it.images)) for it in job.items])
        job.vector = job_vector(job.task, job.features)
        job.predicted = ms.cost.predict(job.vector)
        if job.total_steps == 0:
            job.total_steps = sum(it.steps for it in job.items)
        self.store.add(job)
        ms.queue.push(job)
        pos, job.expected_at_submit = self.standing(ms, job)
        job.pos_at_submit = pos
        self.metrics.submitted.labels(ms.name, job.task).inc()
        log.info(
            "job %s %s on %s: waiting (pos %d, expected %.2fs, priority %d)",
            job.id, job.task, ms.name, pos, job.expected_at_submit, job.priority,
        )
        return job

    def cancel(self, job: Job) -> None:
        if job.status.finished:
            return
        ms = self.registry.models[job.model]
        if job.status is JobStatus.WAITING and ms.queue.remove(job):
            self.finish(ms, job, JobStatus.CANCELLED, "cancelled before it ran")
        else:  # running: the backend stops at its next step
            job.cancel_event.set()

    def clear(self) -> int:
        count = 0
        for ms in self.registry.models.values():
            for job in ms.queue.drain():
                self.finish(ms, job, JobStatus.CANCELLED, "cancelled by /api/clear")
                count += 1
        return count

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"unknown task_id {job_id!r} (finished jobs are kept for "
                           f"{self.settings.queue.result_ttl_seconds:.0f}s)", param="task_id")
        return job

    # ----- state changes (called by workers) ----------------------------------------

    def mark_running(self, ms: ModelState, job: Job) -> None:
        job.status = JobStatus.RUNNING
        job.started_at = time.time()
        job.started_mono = time.monotonic()
        ms.running.add(job)
        self.metrics.wait.labels(ms.name).observe(job.started_at - job.created_at)
        log.info("job %s on %s: running (waited %.2fs)", job.id, ms.name, job.started_at - job.created_at)
        job.touch()

    def finish(self, ms: ModelState, job: Job, status: JobStatus, message: str | None = None) -> None:
        if job.status.finished:
            return
        was_running = job.status is JobStatus.RUNNING
        ms.running.discard(job)
        job.status = status
        job.message = message
        job.finished_at = time.time()
        run_s = job.finished_at - job.started_at if job.started_at else 0.0
        if status is JobStatus.DONE:
            job.step = job.total_steps
            assert job.features is not None
            worker_s = job.worker_seconds if job.worker_seconds is not None else run_s
            ms.cost.observe(job.task, job.features, worker_s, job.predicted)
            self.metrics.duration.labels(ms.name, job.task).observe(run_s)
            total = job.finished_at - job.created_at
            if total > 0:
                self.metrics.forecast_error.labels(ms.name).observe(abs(job.expected_at_submit - total) / total)
        self.metrics.jobs.labels(ms.name, job.task, status.value).inc()
        self.store.finished(job)
        log.info(
            "job %s on %s: %s%s%s",
            job.id, ms.name, status.value,
            f" in {run_s:.2f}s" if was_running else "",
            f" ({message})" if message else "",
        )
        job.touch()
        for hook in self.done_hooks:
            work = hook(job)  # None when the hook has nothing to do: no task for it
            if work is not None:
                self.spawn(work)

    # ----- positions and forecasts ---------------------------------------------------

    def _running_seconds(self, ms: ModelState, now: float) -> float:
        total = 0.0
        for j in ms.running:
            total += running_remaining(
                now, j.started_mono or now, j.predicted, j.step, j.total_steps, j.last_step_mono
            )
        return total

    def _queue_seconds(self, ms: ModelState) -> float:
        now = time.monotonic()
        ahead = ms.queue.total()
        return (self._running_seconds(ms, now) + ms.cost.predict(ahead)) / ms.cfg.target_inflight

    def standing(self, ms: ModelState, job: Job) -> tuple[int, float]:
        """(position, forecast seconds until done) of ``job``: one O(log n) look-up.

        ``pos`` counts the unfinished jobs ahead on the same model (running ones
        included), so 0 means running, or next with the worker idle.
        """
        if job.status.finished:
            return 0, 0.0
        now = time.monotonic()
        if job.status is JobStatus.RUNNING:
            return 0, running_remaining(
                now, job.started_mono or now, job.predicted, job.step, job.total_steps, job.last_step_mono
            )
        ahead = ms.queue.ahead(job)
        before = (self._running_seconds(ms, now) + ms.cost.predict(ahead)) / ms.cfg.target_inflight
        return len(ms.running) + int(ahead[DIM]), before + job.predicted

    def _depths(self) -> dict[str, tuple[int, int]]:
        return {name: (len(ms.queue), len(ms.running)) for name, ms in self.registry.models.items()}
