"""The worker of one process: for every model loaded here, one loop that does::

    claim -> run (the model's thread) -> outcome (post-process, encode, store, learn, deliver)

One loop per model, so one pipeline call per model at a time (``target_inflight``
will mean the jobs of one batched call).  Only ``run`` holds the model: as soon as
its pipeline calls return, the loop claims the next job while this one's results
are stored (``outcome.py``), so the GPU never waits for PNG encoding.  ``run_job``
is the one place where a job's outcome is decided: done, cancelled, failed, or (a
worker stopping with jobs of a shared queue) released back to the queue.

Its collaborators: the model host (``host.py``: models and their state), presence
(``presence.py``: heartbeat, leases, reaper), the job context (``context.py``) and
the pipeline calls (``execute.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from .. import deadlines
from ..backends.base import BackendError, JobCancelled, device_fault, failure_message
from ..batch_plan import batch_features
from ..broker.base import Broker, BrokerUnavailable
from ..jobs import JobRecord, JobStatus
from ..timing import measured_phases
from ..watchdog import job_limit, stall_message, timeout_message, watch
from .batch import Batcher, execute_batch, shares
from .context import JobContext, LoopClock, Running
from .execute import execute
from .host import ModelHost
from .outcome import Outcomes
from .presence import Presence, worker_id
from .process import ModelProcessLost
from .waiting import cancel_waiting

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..config import Settings
    from ..delivery.hooks import Delivery
    from ..metrics import Metrics
    from ..registry import ModelState, Registry

log = logging.getLogger("easel")
CLAIM_WAIT_SECONDS = 1.0  # a claim waits this long for work before the loop checks whether to stop


class Stalled(Exception):
    """The job reported no step for its stall limit; ``work`` is its pipeline call, still under way."""

    def __init__(self, message: str, work: asyncio.Future[Any]) -> None:
        super().__init__(message)
        self.work = work


class Worker:
    def __init__(self, settings: Settings, broker: Broker, registry: Registry, metrics: Metrics, delivery: Delivery | None) -> None:
        self.settings = settings
        self.broker = broker
        self.registry = registry
        self.id = settings.broker.worker_id or worker_id()
        self.running: dict[str, Running] = {}
        self.claiming = True
        self.presence = Presence(settings, broker, registry, self.id, self._running_jobs, self._stop_job)
        self.host = ModelHost(settings, registry, broker, metrics, self.presence.announce, lambda: {r.job.model for r in self.running.values()})
        self.host.on_ready = self._serve
        self.host.on_stopping = self._stop_serving
        self.presence.tick = self.host.tick
        self.outcomes = Outcomes(settings, broker, metrics, self.host, delivery)
        self.batcher = Batcher(settings, broker)
        self.metrics = metrics
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._ready: list[ModelState] | None = None  # during start(): the models loaded, taking jobs once it is done
        self._finishing: set[str] = set()  # jobs past their pipeline calls, their results being stored
        self._clock: LoopClock | None = None  # made in start(), on the loop's thread

    # ----- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._clock = LoopClock()
        self.broker.on_cancel(self._stop_job)
        self.broker.on_command(self._command)
        self._ready = []  # until every enabled model has loaded, none takes a job (a failed start claims nothing)
        for name, cfg in self.settings.models.items():
            if cfg.enabled:
                await self.host.load(name)
        ready, self._ready = self._ready, None
        for ms in ready:
            self._serve(ms)
        try:  # presence of every model at once (a load_on_demand model's forecast needs it)
            await self.presence.beat_once()
        except BrokerUnavailable:
            pass
        self.presence.start()

    async def stop(self, grace: float) -> None:
        """Stop claiming; let running jobs finish within ``grace`` seconds; then stop
        them: released back to a shared queue (distributed), cancelled otherwise."""
        self.claiming = self.host.accepting = False
        if not self.broker.distributed:
            for name in self.registry.models:
                await cancel_waiting(self.broker, name, "the server shut down before the job ran")
        loops = list(self._loops.values())
        if loops:
            _, pending = await asyncio.wait(loops, timeout=grace)
            if pending:
                log.warning("shutdown: grace period over, stopping %d running job(s)", len(self.running))
                self._stop_running()
                await asyncio.wait(pending, timeout=30)
        await self.host.drain(5)
        await self.presence.stop()
        await self.host.close()

    def _serve(self, ms: ModelState) -> None:
        """The host made ``ms`` ready: take its jobs (once the worker has started)."""
        if self._ready is not None:
            self._ready.append(ms)
            return
        if self.claiming and (ms.name not in self._loops or self._loops[ms.name].done()):
            self._loops[ms.name] = asyncio.create_task(self._claim_loop(ms), name=f"easel-{ms.name}")

    async def _stop_serving(self, model: str) -> None:
        """Stop taking ``model``'s jobs: running ones stop (released to a shared queue,
        else cancelled) and its loop ends."""
        self._stop_running(model)
        loop = self._loops.pop(model, None)
        if loop is not None and loop is not asyncio.current_task():  # a loop that unloads its own model just ends
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    def _running_jobs(self) -> list[tuple[str, str, int]]:
        return [(r.job.id, r.job.model, r.attempt) for r in self.running.values()]

    def _stop_running(self, model: str | None = None) -> None:
        """Stop the running jobs (of ``model``): released back to a shared queue, else cancelled."""
        for r in list(self.running.values()):
            if model is None or r.job.model == model:
                r.release = self.broker.distributed
                r.cancel.set()

    def _stop_job(self, job_id: str) -> None:
        r = self.running.get(job_id)
        if r is not None:
            r.cancel.set()

    def _command(self, model: str, action: str) -> None:
        if model in self.registry.models and action in ("load", "unload"):
            self.host.spawn(self.host.load(model) if action == "load" else self.host.unload(model))

    def delayed(self, job_id: str) -> float:
        """Seconds a job running in this process is behind what its progress says: the
        CPU time the event loop has run since its last step (a pipeline thread in this
        process waits for the GIL meanwhile; a model in its own process does not)."""
        r = self.running.get(job_id)
        return r.ctx.held_up() if r is not None and r.ctx is not None else 0.0

    # ----- the job path ------------------------------------------------------------------------

    async def _claim_loop(self, ms: ModelState) -> None:
        """Claim and run jobs of ``ms`` one after the other.  A job's encode-and-store
        (``finishing``) starts once the next claim has been answered: started first, it
        would hold the GIL in its encoding thread while the claim's answer waits to be
        read, and the model would sit idle meanwhile.  A job claimed that way, the
        moment the one before it left the model, is timed from that moment: the claim
        and hand-over between two queued jobs are part of what a job in the queue costs.
        When the claim of the job just run left the queue empty and no job has been
        submitted since (``Broker.emptied``), its encode-and-store starts first: no
        job would be claimed, and the round trip would only delay its answer."""
        finishing: Coroutine[Any, Any, None] | None = None
        freed_at = 0.0  # time.monotonic() when this loop's last job left the model
        try:
            while self.claiming and ms.state == "loaded":
                jobs: list[JobRecord] = []
                failure: BrokerUnavailable | None = None
                if finishing is not None and self.broker.emptied(ms.name):
                    self.host.spawn(finishing)
                    finishing = None
                back_to_back = finishing is not None
                try:  # with a job to finish: one try now, without waiting for work
                    lease = self.settings.broker.lease_seconds
                    jobs = await self.batcher.claim(ms, self.id, lease, 0.0 if finishing else CLAIM_WAIT_SECONDS)
                except BrokerUnavailable as exc:
                    failure = exc
                if finishing is not None:
                    self.host.spawn(finishing)
                    finishing = None
                if failure is not None:
                    log.warning("claim on %s: %s", ms.name, failure)
                    await asyncio.sleep(1.0)
                    continue
                if not jobs:
                    continue
                if not self.claiming or ms.state != "loaded":  # stopped (or stalled) during the claim: give them back
                    for job in jobs:
                        await self.broker.release(job, job.attempt)
                    return
                finishing = await self.run_jobs(ms, jobs, freed_at if back_to_back else None)
                freed_at = time.monotonic()
        finally:
            if finishing is not None:
                self.host.spawn(finishing)

    async def run_jobs(self, ms: ModelState, jobs: list[JobRecord], since: float | None = None) -> Coroutine[Any, Any, None] | None:
        """Run the pipeline call(s) of ``jobs`` (one job, or a batch: ``batch.py``);
        what is left of them (their outcomes: upscale, encode, store, deliver) is
        returned for the caller to start.  Worker time counts from ``since`` (the
        previous job left the model then), else from now."""
        self.host.residency.touch(ms.name)
        after, first = bool(self._finishing), not ms.warm
        rs = [Running(job, job.attempt, after_job=after, first_call=first) for job in jobs]
        for r in rs:
            self.running[r.job.id] = r
        try:
            return await self._run(ms, list(rs), since)  # (a copy: it drops jobs that cannot run)
        finally:
            for r in rs:
                self.running.pop(r.job.id, None)
            self.host.residency.touch(ms.name)
            self.host.on_demand.retry()  # an on-demand model may fit now

    async def _run(self, ms: ModelState, rs: list[Running], since: float | None) -> Coroutine[Any, Any, None] | None:
        for r in list(rs):
            job = r.job
            if (missed := deadlines.miss(job, self.broker.now(), job.predicted)) is not None:
                await self.outcomes.end(r, JobStatus.ERROR, missed)  # it cannot make it any more: not on the GPU
                rs.remove(r)
                continue
            self.metrics.wait.labels(ms.name).observe(max(0.0, (job.started_at or 0) - job.created_at))
            log.info("job %s on %s: running (attempt %d, waited %.2fs)", job.id, ms.name, job.attempt, (job.started_at or 0) - job.created_at)
        if not rs:
            return None
        backend = ms.backend
        assert backend is not None
        clock = None if backend.isolated else self._clock  # an in-process pipeline thread shares the GIL with the loop
        loop = asyncio.get_running_loop()
        for r in rs:
            r.ctx = JobContext(r.job, self.broker, r.cancel, loop, clock)
        ctxs = [r.ctx for r in rs if r.ctx is not None]
        start = since if since is not None else time.monotonic()
        follows = [asyncio.create_task(ctx.follow_previews()) for ctx in ctxs]
        try:
            blobs = {key: data for r in rs for key in r.job.inputs if (data := await self.broker.get_blob(key)) is not None}
            outs = await self._execute(ms, rs, ctxs, blobs)
            worker_s = time.monotonic() - start  # the next job starts now: this is what a job ahead costs
        except Stalled as exc:  # ended now, without waiting for the hung call
            for r in rs:
                await self.outcomes.end(r, JobStatus.ERROR, {"message": str(exc)})
            await self.host.after_stall(ms, rs[0].job.id, exc.work)
            return None
        except JobCancelled as exc:  # a training run may say how far it got
            for r in rs:
                await self._stopped(r, str(exc))
            return None
        except ModelProcessLost as exc:  # a device fault, or the process was killed: a new one for the next job
            for r in rs:
                await self.outcomes.end(r, JobStatus.ERROR, {"message": str(exc)})
            self.host.restart(ms, str(exc))
            return None
        except Exception as exc:  # the jobs fail, the worker goes on
            if not isinstance(exc, BackendError):
                log.exception("job %s on %s failed", ",".join(r.job.id for r in rs), ms.name)
            for r in rs:
                await self.outcomes.end(r, JobStatus.ERROR, {"message": failure_message(exc)})
            if device_fault(exc):  # in this process: CUDA's context is broken for good
                self.host.device_fault(ms, failure_message(exc))
            return None
        finally:
            for follow in follows:
                follow.cancel()
        await self.host.warmed(ms)
        await self.host.check_fit(ms)
        if len(rs) > 1:
            batch_learn(rs, worker_s)  # the forecast learns the one call, from its lead job
        finishing = []
        for r, share, (images, item_seconds) in zip(rs, shares([r.job for r in rs]), outs, strict=True):
            if images is None:  # cancelled during its batch's call: the others went on
                await self._stopped(r, "")
                continue
            assert r.ctx is not None
            phases = measured_phases(r.ctx.calls, worker_s)
            self._finishing.add(r.job.id)  # until its results are stored: the next job runs right after it
            scaled = tuple(p * share for p in phases) if phases is not None else None
            finishing.append(self._finish(r, images, item_seconds, worker_s * share, scaled, start + worker_s))  # type: ignore[arg-type]
        return _together(finishing) if finishing else None

    async def _stopped(self, r: Running, message: str) -> None:
        """A job stopped before its results: by a time limit (error), to be released
        (the worker stops), or cancelled."""
        if r.error is not None:
            await self.outcomes.end(r, JobStatus.ERROR, {"message": r.error})
        elif r.release:
            await self.outcomes.release(r)
        else:
            await self.outcomes.end(r, JobStatus.CANCELLED, {"message": message or "cancelled while running"})

    async def _finish(self, r: Running, images: list[Image], item_seconds: list[float], worker_s: float,
                      phases: tuple[float, float, float] | None, left_at: float) -> None:  # fmt: skip
        try:
            await self.outcomes.finish(r, images, item_seconds, worker_s, phases, left_at)
        finally:
            self._finishing.discard(r.job.id)

    async def _execute(
        self, ms: ModelState, rs: list[Running], ctxs: list[JobContext], blobs: dict[str, bytes]
    ) -> list[tuple[list[Image] | None, list[float]]]:
        """The pipeline calls on the model's thread (one job's, or one call of a
        batch: each job's images, None for a job dropped from it), under the time
        limits (server/watchdog.py): past the job timeout they are stopped at their
        next step (``r.error``); stalled, this raises ``Stalled`` at once."""
        job, backend, ctx = rs[0].job, ms.backend, ctxs[0]
        assert backend is not None
        max_pixels = self.settings.limits.max_image_pixels

        def run() -> list[tuple[list[Image] | None, list[float]]]:
            if len(rs) == 1:
                out: list[tuple[list[Image] | None, list[float]]] = [execute(backend, job, ctx, blobs, max_pixels)]
            else:
                images, dropped, seconds = execute_batch(backend, [r.job for r in rs], ctxs, blobs, max_pixels)
                out = [(None if gone else imgs, [seconds * s]) for imgs, gone, s in zip(images, dropped, shares([r.job for r in rs]), strict=True)]
            self.host.job_ended(ms, backend)  # on this thread: the model's peak, its cached blocks
            return out

        call = anyio.to_thread.run_sync(run)
        timeout = job_limit(self.settings, ms.name, "job_timeout_seconds") if job.task != "train" else None
        stall = job_limit(self.settings, ms.name, "stall_seconds")
        if timeout is None and stall is None:
            return await call
        work = asyncio.ensure_future(call)

        def timed_out() -> None:
            assert timeout is not None
            for r in rs:
                r.error = timeout_message(timeout)
                r.cancel.set()
            log.warning("job %s on %s: over its time limit of %g s (%s); stopping it", job.id, ms.name, timeout.seconds, timeout.key)

        ctx.last_step = started = time.monotonic()
        guard = asyncio.create_task(watch(started, lambda: max(c.last_step for c in ctxs), timeout, stall, timed_out))
        try:
            await asyncio.wait((work, guard), return_when=asyncio.FIRST_COMPLETED)
        finally:
            guard.cancel()
        if work.done():
            return work.result()  # type: ignore[no-any-return]
        assert stall is not None
        for c in ctxs:
            c.abandoned = True  # should the call come back, it stops at its next step
        work.add_done_callback(_consume)
        log.error("job %s on %s: no step for %g s (%s): stalled", job.id, ms.name, stall.seconds, stall.key)
        raise Stalled(stall_message(stall, ms.name, backend.isolated), work)


async def _together(finishing: list[Coroutine[Any, Any, None]]) -> None:
    """The outcomes of a batch's jobs, one after the other."""
    for coro in finishing:
        await coro


def batch_learn(rs: list[Running], seconds: float) -> None:
    """What the forecast learns of a batch: the one call (its features, seconds and
    phases), taught by its lead job; the others teach nothing."""
    lead = rs[0]
    phases = measured_phases(lead.ctx.calls, seconds) if lead.ctx is not None else None
    lead.learn_as = (batch_features([r.job for r in rs], 0.0).tolist(), seconds, phases)
    for r in rs[1:]:
        r.learns = False


def _consume(work: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome (its job already ended), so nothing warns of it."""
    if not work.cancelled():
        work.exception()
