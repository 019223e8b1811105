"""The service layer: what routes call (submit, status, wait, cancel, list, fetch,
models).  It talks to the broker and to nothing below it; on a node that also runs
workers (role ``all``) it asks the local worker's model host to load models.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from . import allowlist
from .auth import OPEN, Caller, Keys
from .broker.base import ALL, Broker, BrokerUnavailable, QueueFullError, QuotaRefused, SubmitKey, WorkerInfo
from .deadlines import end_if_missed, refuse_unreachable
from .errors import Conflict, Gone, NotFound, QueueFull, Unavailable
from .families import default_steps
from .forecast import call_features
from .jobs import ImageResult, JobRecord, JobStatus, live_preview_key, preview_key, result_key
from .quotas import admission, exceeded
from .registry import ModelState, Registry
from .standing import Forecasts, Where, job_features, predict, queue_seconds, standing
from .workers import LocalWorkers, SharedWorkers

if TYPE_CHECKING:
    from .build import UrlFetcher
    from .config import Settings
    from .metrics import Metrics
    from .worker.loop import Worker

log = logging.getLogger("easel")
FOLLOW_SECONDS = 30.0  # a follow lasts this long unless renewed
PREVIEW_WANT_SECONDS = 5.0  # a previews=true follow lasts this long unless renewed
SubmitCheck = Callable[[JobRecord], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Idempotency:
    """An ``Idempotency-Key`` header and what the request asked for."""

    key: str
    fingerprint: str  # a hash of the decoded request (and its uploads)

    def scope(self, caller: Caller) -> str:
        """Keys are per owner: two keys may use the same Idempotency-Key."""
        return f"{caller.key_id or '-'}:{hashlib.sha256(self.key.encode()).hexdigest()[:32]}"

    @classmethod
    def of(cls, header: str | None, *parts: bytes) -> Idempotency | None:
        if not header:
            return None
        digest = hashlib.sha256()
        for part in parts:
            digest.update(hashlib.sha256(part).digest())
        return cls(header, digest.hexdigest())


@dataclass
class ModelStatus:
    state: str  # across the workers that serve the model
    load_error: str | None
    waiting: int
    running: int
    workers: list[WorkerInfo]
    paused: bool = False


class Service:
    def __init__(
        self, settings: Settings, broker: Broker, registry: Registry, metrics: Metrics, keys: Keys, *,
        worker: Worker | None = None, submit_checks: list[SubmitCheck] | None = None, fetch_url: UrlFetcher | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.keys = keys
        self.broker = broker
        self.registry = registry  # configured models (loaded only where a worker is)
        self.metrics = metrics
        self.forecasts = Forecasts(settings, broker)
        self.worker = worker  # the workers of this process, if any (role all)
        # who serves the models: this process alone (memory broker), or workers anywhere (Redis)
        self.workers = LocalWorkers(worker) if worker is not None and not broker.distributed else SharedWorkers(broker, self.forecasts, worker)
        self.submit_checks = submit_checks or []  # before a job is queued (URL guards, upscaler...)
        self.fetch_url = fetch_url  # reference images given by URL
        if worker is not None:
            self.forecasts.delayed = worker.delayed
            worker.presence.on_change.append(self.forecasts.presence_changed)
        self.accepting = True
        self.started_at = time.time()

    # ----- models ----------------------------------------------------------------------

    def model(self, name: str | None) -> ModelState:
        """A configured model (404 for an unknown name)."""
        return self.registry.get(name)

    def models(self, caller: Caller = OPEN) -> list[ModelState]:
        """Every configured model (``caller``: those its allow-list lets it use)."""
        return [ms for ms in self.registry.models.values() if allowlist.may_use(caller, ms.name)]

    async def forecast_report(self, ms: ModelState) -> dict[str, dict[str, object]]:
        """What the model's forecast has learned, per fit, in seconds, with what a job
        of the model's default size and steps would take (for /api/ps and /health)."""
        cfg = ms.cfg
        task = "upscale" if "upscale" in ms.capabilities.tasks else "generate"
        steps = default_steps(cfg)
        example = (task, call_features(task, steps, cfg.default_width * cfg.default_height / 1e6, 1),
                   f"{cfg.default_width}x{cfg.default_height}, {steps} steps, 1 image")  # fmt: skip
        return (await self.forecasts.cost(ms.name)).report(example)

    async def model_state(self, ms: ModelState) -> tuple[str, str | None, int]:
        """(state, load error, live slots) of a model across the workers serving it."""
        return await self.workers.slots(ms)

    async def model_status(self, ms: ModelState) -> ModelStatus:
        return (await self.model_statuses([ms]))[0]

    async def model_statuses(self, models: list[ModelState]) -> list[ModelStatus]:
        """The status of each model, its queue depths read before its presence (see
        ``_presence``: the last await of a listing)."""
        depths = [await self.broker.depth(ms.name) for ms in models]
        paused = await self.broker.paused()
        presence = await self.workers.presence(models)
        return [
            ModelStatus(state, error, *depth, infos, paused=bool(paused & {ms.name, ALL}))
            for (state, error, infos), depth, ms in zip(presence, depths, models, strict=True)
        ]

    async def pause(self, name: str, paused: bool) -> set[str]:
        """Pause or resume model ``name``'s queue (``ALL``: every queue); the paused queues after."""
        await self.broker.pause(name if name == ALL else self.model(name).name, paused)
        log.info("%s %s by an admin", "every queue" if name == ALL else f"the queue of {name}", "paused" if paused else "resumed")
        return await self.broker.paused()

    async def served_model(self, name: str | None) -> ModelState:
        """A model jobs may be queued for (a 409 where none will run them)."""
        ms = self.model(name)
        self.workers.check_served(ms)
        return ms

    async def load(self, name: str, *, wait: bool = True) -> None:
        """Load ``name`` (and wait for it unless ``wait`` is false)."""
        ms = self.model(name)
        await self.workers.load(ms.name, wait)
        self.forecasts.presence_changed(ms.name)

    async def unload(self, name: str) -> None:
        ms = self.model(name)
        await self.workers.unload(ms.name)
        self.forecasts.presence_changed(ms.name)

    # ----- submit ----------------------------------------------------------------------

    async def submit(
        self, job: JobRecord, blobs: dict[str, bytes], caller: Caller, idempotency: Idempotency | None = None
    ) -> JobRecord:
        """Allow-lists (``allowlist``), checks, forecast, then into the broker's queue
        with the key's quota decided in the same step (``quotas``); ``job`` gets its
        standing.  With an idempotency key bound to a job: that job (nothing new).

        A submit is accepted or not, never both: the broker queues the job and binds
        its key in one step, and refuses that step once the call has given up on its
        answer (``SubmitUnknown``: a 503 naming the task id, whose fate
        ``GET /api/status`` tells).  After the job is queued nothing fails the
        request: the standing written back is a nicety."""
        if not self.accepting:
            raise Unavailable("the server is shutting down and accepts no new jobs")
        allowlist.check(caller, job)
        job.owner = caller.key_id
        if self.settings.queue.fairness == "fair":  # the brokers take turns by share (server/queue.py)
            job.share, job.weight = caller.share, caller.weight
        key = None
        if idempotency is not None:
            key = SubmitKey(idempotency.scope(caller), idempotency.fingerprint, self.settings.queue.result_ttl_seconds)
            held = await self.broker.submitted(key.key)
            if held is not None:
                return await self._same_submit(idempotency, *held)
        held = await self._submit(job, blobs, caller, key)
        if held is not None and idempotency is not None:  # another request with the key won the race
            return await self._same_submit(idempotency, *held)
        return job

    async def _same_submit(self, idempotency: Idempotency, job_id: str, fingerprint: str) -> JobRecord:
        if fingerprint != idempotency.fingerprint:
            raise Conflict(
                f"Idempotency-Key {idempotency.key!r} was already used for a different request (task {job_id}); "
                "send a new key for a new request",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        job = await self.broker.get(job_id)
        if job is None:  # expired between the two reads
            raise Conflict(f"the job of Idempotency-Key {idempotency.key!r} just expired; retry", param="Idempotency-Key")
        log.info("job %s: the same request again (Idempotency-Key); nothing new queued", job.id)
        return job

    async def _submit(
        self, job: JobRecord, blobs: dict[str, bytes], caller: Caller, key: SubmitKey | None
    ) -> tuple[str, str] | None:
        for check in self.submit_checks:
            await check(job)
        if not job.features:  # training jobs bring their own
            job.features = job_features(job, blobs)
        if job.total_steps == 0:
            job.total_steps = sum(it.run_steps for it in job.items)
        cost = await self.forecasts.cost(job.model)
        job.predicted, job.predicted_phases = predict(cost, job)
        await refuse_unreachable(self.forecasts, job)
        adm = admission(caller, job)  # decided by the broker, in the step that queues the job
        try:
            held = await self.broker.submit(job, blobs, self.settings.queue.capacity, key, adm)
        except QueueFullError:
            raise QueueFull(
                f"the queue of model {job.model!r} is full ({self.settings.queue.capacity} jobs); retry later",
                retry_after=await queue_seconds(self.forecasts, job.model),
            ) from None
        except QuotaRefused as refusal:
            assert adm is not None  # only an admission refuses
            raise await exceeded(self.forecasts, adm, refusal) from None
        if held is not None:
            return held
        self.metrics.submitted.labels(job.model, job.task).inc()
        self.workers.queued(job.model)
        try:
            where = await standing(self.forecasts, job)
            await self.broker.update(job, {"pos_at_submit": where.pos, "expected_at_submit": where.wait or 0.0})
        except BrokerUnavailable as exc:  # queued all the same: the answer says so
            log.warning("job %s: queued, its standing not stored (%s)", job.id, exc)
            return None
        log.info(
            "job %s %s on %s: waiting (pos %d, expected %s, priority %d)",
            job.id, job.task, job.model, where.pos,
            f"{where.wait:.2f}s" if where.wait is not None else "unknown: no worker", job.priority,
        )
        return None

    # ----- reading -----------------------------------------------------------------------

    async def get(self, job_id: str, caller: Caller = OPEN) -> JobRecord:
        """The job, if ``caller`` may see it (another key's job is a 404, as if unknown)."""
        job = await self.broker.get(job_id)
        if job is None or not caller.sees(job.owner, job.id):
            raise NotFound(
                f"unknown task_id {job_id!r} (finished jobs are kept for {self.settings.queue.result_ttl_seconds:.0f}s)",
                param="task_id",
            )
        return job

    async def where(self, job: JobRecord) -> tuple[JobRecord, Where]:
        """Where ``job`` stands (a waiting job past hope of its deadline ends here)."""
        where = await standing(self.forecasts, job)
        if job.deadline_at is not None and job.status is JobStatus.WAITING:
            job = await end_if_missed(self.forecasts, job, where)
            if job.status.finished:
                where = await standing(self.forecasts, job)
        return job, where

    async def wait_while(self, job: JobRecord, busy: Callable[[JobRecord], bool], deadline: float) -> JobRecord:
        """Wait through status changes while ``busy(job)`` holds, until ``deadline``
        (``time.monotonic()``); returns the record as it then stands."""
        while busy(job) and (left := deadline - time.monotonic()) > 0:
            await self.broker.wait_change(job.id, left, progress=False)
            job = await self.get(job.id)
        return job

    async def follow(self, job: JobRecord, seconds: float = FOLLOW_SECONDS) -> None:
        """Someone streams ``job``'s progress: its worker writes every step for
        ``seconds`` (renew while the stream lasts)."""
        if self.broker.distributed and not job.status.finished:
            await self.broker.update(job, {"followed_until": self.broker.now() + seconds})

    async def want_previews(self, job: JobRecord, seconds: float = PREVIEW_WANT_SECONDS) -> None:
        """Someone follows ``job`` with previews=true: its worker (any process) makes
        live previews for ``seconds`` (renew while the stream lasts)."""
        if not job.status.finished:
            await self.broker.update(job, {"preview_wanted_until": self.broker.now() + seconds})

    async def live_preview(self, job: JobRecord) -> bytes | None:
        """The latest live preview of a running job (JPEG), if any."""
        return await self.broker.get_blob(live_preview_key(job.id)) if job.preview_seq else None

    async def wait_change(self, job: JobRecord, timeout: float | None, *, progress: bool = True) -> tuple[JobRecord, bool]:
        """Wait for a change, then re-read the record (on a timeout too: a wake-up that
        was lost, e.g. while the events reader reconnected, is caught at the next one)."""
        changed = await self.broker.wait_change(job.id, timeout, progress=progress)
        return await self.get(job.id), changed

    async def image(self, job: JobRecord, index: int, *, delete: bool) -> tuple[ImageResult, bytes]:
        """A done job's image bytes (410 once fetched with delete=true, or expired)."""
        if not 0 <= index < len(job.results):
            raise NotFound(f"index {index} is out of range; task {job.id} has {len(job.results)} image(s)", param="index")
        result = job.results[index]
        key = result_key(job.id, index)
        if result.gone:
            data = None
        elif delete:  # the image and the mark that it was fetched, in one step
            results = list(job.results)
            results[index] = msgspec.structs.replace(result, gone="fetched with delete=true")
            data = await self.broker.take_blob(key, job, {"results": results})
        else:
            data = await self.broker.get_blob(key)
        if data is None:
            raise Gone(f"image {index} of task {job.id} was already fetched with delete=true or expired", param="index")
        return result, data

    async def preview(self, job: JobRecord, index: int) -> bytes | None:
        """Partial image ``index`` of a running job (OpenAI ``partial_images``)."""
        return await self.broker.get_blob(preview_key(job.id, index))

    async def queue(self, limit: int, caller: Caller = OPEN) -> list[JobRecord]:
        """Running then waiting jobs of every model, in run order (``caller``'s own;
        the others still count in its positions and forecasts)."""
        out: list[JobRecord] = []
        for name in self.registry.models:
            out.extend(await self.broker.running(name))
            out.extend(await self.broker.waiting(name, limit))
        return [j for j in out if caller.sees(j.owner, j.id)]

    # ----- cancel --------------------------------------------------------------------------

    async def cancel(self, job: JobRecord) -> JobRecord:
        out = await self.broker.cancel(job.id, "cancelled before it ran") or job
        if job.status is JobStatus.WAITING and out.status is JobStatus.CANCELLED:
            log.info("job %s on %s: cancelled (%s)", job.id, job.model, out.message)
        return out

    async def move(self, job: JobRecord, to: str, caller: Caller) -> JobRecord:
        """A waiting job to the front or the back of its owner's jobs at its priority;
        an admin's "front" puts it first of its priority (its key's turn next)."""
        if not caller.admin and self.settings.queue.fairness != "fair":
            raise Conflict('only an admin moves jobs under queue.fairness "fifo" (the queue is not kept per key)', code="queue_not_fair")
        if not await self.broker.move(job.id, to == "front", caller.admin and to == "front"):
            job = await self.get(job.id, caller)
            raise Conflict(f"task {job.id} is {job.status.value}: only a waiting job can be moved", param="task_id", code="job_not_waiting")
        log.info("job %s on %s: moved to the %s (%s)", job.id, job.model, to, "admin" if caller.admin else "owner")
        return await self.get(job.id, caller)

    async def clear(self, caller: Caller = OPEN) -> int:
        """Cancel every waiting job (an admin or an open server), or the caller's own."""
        if caller.admin:
            return await self.broker.clear("cancelled by /api/clear")
        count = 0
        for name in self.registry.models:
            for job in await self.broker.waiting(name, 2**31):
                if job.owner == caller.key_id and await self.broker.cancel(job.id, "cancelled by /api/clear"):
                    count += 1
        return count

    async def reap_forever(self) -> None:
        """An API node runs the broker's reaper too: the jobs of dead workers go back to
        the queue (or end as error) even while no worker is alive to notice."""
        while True:
            await asyncio.sleep(self.settings.broker.heartbeat_seconds)
            try:
                await self.broker.reap()
            except BrokerUnavailable as exc:
                log.warning("reaper: %s", exc)
            except Exception:
                log.exception("reaper failed")

    def sign(self, url: str, job: JobRecord, index: int) -> str:
        """The link to image ``index`` of ``job``, fetching it without the key until it expires."""
        return self.keys.signer(url, job, index)

    async def depths(self) -> dict[str, tuple[int, int]]:
        out = {}
        for name in self.registry.models:
            try:
                out[name] = await self.broker.depth(name)
            except BrokerUnavailable:
                out[name] = (0, 0)
        return out

