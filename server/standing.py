"""Where a job stands: its position and forecast, from the broker's queue sums, the
running jobs' progress, the model's learned costs and its live workers.

    wait = (remaining of the running jobs + cost of the calls ahead) / live slots
           + the cost of the job's own call

When the model batches (``target_inflight`` above 1), the jobs ahead are counted as
the calls they will form, and the job's own call with the compatible jobs that share
it: near the head of the queue (the first ``batch_plan.WINDOW`` waiting jobs, all the
worker's planner looks at) by replaying the planner over them (``batch_plan.replay``:
the batches that overtake the job are counted before it, the one it joins as its own
call); further back from the queue's sums (``batch_forecast``).

``pos`` counts the unfinished jobs ahead on the same model (running ones included),
so 0 means running, or next with a worker free.  With no live worker for the model,
or while an admin has paused its queue, there is no honest forecast: ``wait`` is
None and ``note`` says why.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import batch_forecast
from .batch_forecast import ahead_in_call, behind, class_of, waiting_seconds
from .batch_plan import WINDOW, replay
from .broker.base import ALL, Broker, WorkerInfo
from .config import Settings
from .features import DIM, FITS, NF, job_vector
from .forecast import AFTER_JOB, CostModel, call_features, prior_vector, sum_features, with_after_job
from .jobs import JobRecord, JobStatus
from .residency import on_demand_slots
from .timing import running_remaining

REFRESH_SECONDS = 0.5  # how stale learned costs and worker presence may be where the broker cannot say (redis)


@dataclass
class _Cached:
    value: object
    version: int | None
    at: float


class Forecasts:
    """Per-model cost models over the broker's statistics, and live worker slots."""

    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.delayed: Callable[[str], float] = lambda job_id: 0.0  # a running job's seconds behind (Runner.delayed)
        self._costs: dict[str, _Cached] = {}
        self._workers: dict[str, _Cached] = {}
        self._presence_generation = 0
        self._paused: _Cached | None = None
        self._replays: dict[str, tuple[tuple[str, ...], CostModel, int, float, dict[str, tuple[float, float]]]] = {}

    async def cost(self, model: str) -> CostModel:
        version = self.broker.stats_version(model)
        cached = self._costs.get(model)
        now = time.monotonic()
        if cached is not None and (cached.version == version if version is not None else now - cached.at < REFRESH_SECONDS):
            return cached.value  # type: ignore[return-value]
        cfg = self.settings.models.get(model)
        if cfg is not None and cfg.forecast_prior is not None:
            priors: dict[str, list[float]] = {fit: prior_vector(cfg.forecast_prior).tolist() for fit in FITS}
            stats = await self.broker.cost_stats(model)
        else:  # both reads at once: one round trip to a shared broker, not two
            priors, stats = await asyncio.gather(self.broker.priors(model), self.broker.cost_stats(model))
        cost = CostModel(priors)
        cost.load(stats)
        self._costs[model] = _Cached(cost, version, now)
        return cost

    def forget(self, model: str) -> None:
        """Drop what is cached for ``model`` (a job of it just finished here)."""
        self._costs.pop(model, None)
        self._workers.pop(model, None)

    async def workers(self, model: str) -> list[WorkerInfo]:
        cached = self._workers.get(model)
        now = time.monotonic()
        if cached is not None and (not self.broker.distributed or now - cached.at < REFRESH_SECONDS):
            return cached.value  # type: ignore[return-value]
        generation = self._presence_generation
        infos = await self.broker.workers(model)
        if self.broker.distributed and generation == self._presence_generation:  # not stale already
            self._workers[model] = _Cached(infos, None, now)
        return infos

    def presence_changed(self, model: str) -> None:
        """A worker of this process loaded or unloaded a model: forget every cached
        presence (one load may have evicted another model), and any fetch under way."""
        self._presence_generation += 1
        self._workers.clear()

    async def paused(self, model: str) -> bool:
        """Whether ``model``'s queue is paused (its own pause, or every queue's)."""
        now, version = time.monotonic(), self.broker.pause_version
        cached = self._paused  # read afresh when a pause or resume reached this node (and now and then with Redis)
        if cached is None or cached.version != version or (self.broker.distributed and now - cached.at >= REFRESH_SECONDS):
            cached = self._paused = _Cached(await self.broker.paused(), version, now)
        return bool(cached.value & {model, ALL})  # type: ignore[operator]

    def replayed(self, model: str, waiting: list[JobRecord], cost: CostModel, size: int, now: float) -> dict[str, tuple[float, float]]:
        """``batch_plan.replay`` of ``model``'s first waiting jobs, kept while they and
        the costs stay the same (for up to ``REFRESH_SECONDS``: deadlines move with the
        clock), so a listing of the queue replays it once, not once per job."""
        cfg = self.settings.models.get(model)
        max_delay = cfg.batch_max_delay if cfg is not None else 0.0
        ids = tuple(j.id for j in waiting)
        hit = self._replays.get(model)
        if hit is not None and hit[0] == ids and hit[1] is cost and hit[2] == size and 0 <= now - hit[3] < REFRESH_SECONDS:
            return hit[4]
        out = replay(waiting, cost, size, max_delay, now)
        self._replays[model] = (ids, cost, size, now, out)
        return out

    async def slots(self, model: str) -> int:
        return sum(w.slots for w in await self.workers(model) if w.state == "loaded")

    def running(self, job: JobRecord, now: float) -> float:
        """Seconds left for a running job: what its progress says (``running_seconds``),
        plus what a worker of this process says it is held up by since its last step."""
        return running_seconds(job, now) + self.delayed(job.id)


@dataclass
class Where:
    pos: int
    wait: float | None  # forecast seconds until done; None: no live worker to forecast with
    note: str | None = None  # why there is no forecast
    paused: bool = False  # the model's queue is paused: it starts nothing (no forecast until it resumes)


def paused_note(model: str) -> str:
    return f"the queue of model {model!r} is paused by an admin: queued jobs start once it resumes"


def no_worker_note(model: str) -> str:
    return f"no worker is serving model {model!r} right now; the job waits in the queue until one is"


async def standing(forecasts: Forecasts, job: JobRecord) -> Where:
    """(position, forecast seconds until done) of ``job``: O(log n) in the queue (and a
    read of the first ``WINDOW`` waiting jobs for one near the head of a model that batches)."""
    if job.status.finished:
        return Where(0, 0.0)
    broker = forecasts.broker
    cost = await forecasts.cost(job.model)
    now = broker.now()
    if job.status is JobStatus.RUNNING:
        return Where(0, forecasts.running(job, now))
    slots = await forecasts.slots(job.model)
    st = await broker.standing(job, job.model)
    claimed = next((r for r in st.running if r.id == job.id), None)
    if claimed is not None:  # a worker took it since ``job`` was read
        return Where(0, forecasts.running(claimed, now))
    pos = len(st.running) + int(st.ahead[DIM])
    if await forecasts.paused(job.model):
        return Where(pos, None, paused_note(job.model), paused=True)
    workers = await forecasts.workers(job.model)
    load = 0.0  # a load_on_demand model not loaded yet: its learned load time comes first
    if slots == 0 and (demand := on_demand_slots(forecasts.settings.models.get(job.model), workers)):
        slots, load = demand
        load += cost.term(job.task, "first_call")  # and its first job's set-up
    elif any(w.cold for w in workers if w.state == "loaded"):  # loaded, no job run yet: the first pays the set-up
        load = cost.term(job.task, "first_call")
    if slots == 0:
        return Where(pos, None, no_worker_note(job.model))
    size = batch_size(forecasts.settings, job.model)
    vec = job_vector(job.task, np.asarray(job.features), job.batch)
    planned = await near_head(forecasts, job, cost, size, int(st.ahead[DIM]), now) if size > 1 else None
    if planned is not None:  # the worker's own plans, replayed
        calls_ahead, call = planned
    else:  # counted from the queue's sums
        companions = 0  # compatible jobs behind it that its call takes too (one more read: the queue's total)
        if size > 1 and class_of(vec) is not None and ahead_in_call(st.ahead, vec, size) < size - 1:
            everything = await broker.standing(None, job.model)
            companions = behind(everything.ahead, st.ahead, vec, queued=job.seq > 0)
        calls_ahead, call = waiting_seconds(cost, st.ahead, vec, size, companions)
    before = (running_ahead(forecasts, cost, st.running, now) + calls_ahead) / slots
    own = job.predicted + call - cost.predict(vec)  # its own forecast, and its call's other jobs
    if pos < slots and len(job.features) == NF:  # it runs at once, right after no other job
        own = max(0.0, own - job.features[AFTER_JOB] * cost.term(job.task, "after_job"))
    return Where(pos, load + before + own)


async def near_head(forecasts: Forecasts, job: JobRecord, cost: CostModel, size: int, ahead: int, now: float) -> tuple[float, float] | None:
    """(seconds of the calls before the job's own, seconds of its own call) for a job
    among the first ``WINDOW`` waiting of a model that batches: the worker's planner
    replayed over them (``batch_plan.replay``), so the batches that will overtake it,
    and the one it joins, are the ones the worker will form.  None further back (or
    when the job was claimed meanwhile): the queue's sums count its calls."""
    if ahead >= WINDOW:
        return None
    waiting = await forecasts.broker.waiting(job.model, WINDOW)
    if not any(w.id == job.id for w in waiting):
        return None
    return forecasts.replayed(job.model, waiting, cost, size, now)[job.id]


def batch_size(settings: Settings, model: str) -> int:
    """The most jobs of ``model`` one pipeline call runs (``target_inflight``)."""
    cfg = settings.models.get(model)
    return cfg.target_inflight if cfg is not None else 1


async def queue_seconds(forecasts: Forecasts, model: str) -> float:
    """Forecast seconds until the model's queue is empty (for Retry-After)."""
    cost = await forecasts.cost(model)
    st = await forecasts.broker.standing(None, model)
    now = forecasts.broker.now()
    slots = max(1, await forecasts.slots(model))
    queued = batch_forecast.queue_seconds(cost, st.ahead, batch_size(forecasts.settings, model))
    return (running_ahead(forecasts, cost, st.running, now) + queued) / slots


def running_ahead(forecasts: Forecasts, cost: CostModel, running: list[JobRecord], now: float) -> float:
    """Seconds until the running jobs leave the model: a job behind them waits for
    that, not for their results to be stored (``CostModel.storing``).  The jobs of
    one batch (claimed together: one worker, one ``started_at``) leave it together."""
    calls: dict[tuple[str | None, float | None], float] = {}
    for r in running:
        left = max(0.0, forecasts.running(r, now) - cost.storing(r.task, np.asarray(r.features)))
        key = (r.worker, r.started_at) if r.batch else (r.id, None)
        calls[key] = max(calls.get(key, 0.0), left)
    return sum(calls.values())


def running_seconds(job: JobRecord, now: float) -> float:
    started = job.started_at or now
    return running_remaining(
        now, started, job.predicted, job.step, job.total_steps, job.last_step_at, job.first_step_at, job.predicted_phases
    )


def predict(cost: CostModel, job: JobRecord) -> tuple[float, list[float]]:
    """(forecast seconds until the job is done, and their phases: before the steps,
    the steps, after them — the last with the storing of its results, which only the
    job itself waits for: in the queue it overlaps the next job's run)."""
    feats = np.asarray(job.features)
    head, steps, tail = cost.phases(job.task, feats)
    store = cost.storing(job.task, feats)
    return cost.predict(job_vector(job.task, feats)) + store, [head, steps, tail + store]


def job_features(job: JobRecord, blobs: dict[str, bytes]) -> list[float]:
    """The forecast's features of a job's pipeline calls (``forecast.call_features``),
    with the sizes of its reference images read from their bytes."""
    calls = [call_features(job.task, it.run_steps, it.megapixels, it.n, [megapixels(blobs.get(k)) for k in it.images]) for it in job.items]
    return with_after_job(sum_features(calls), True).tolist()  # as if queued; ``standing`` says when it is not


def megapixels(data: bytes | None) -> float:
    """An image's size in megapixels from its header (0 when it cannot be read)."""
    if data is None:
        return 0.0
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height / 1_000_000
    except Exception:  # the job's own checks report bad images; a forecast never fails a submit
        return 0.0

