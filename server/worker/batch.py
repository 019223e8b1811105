"""Batching across requests: the jobs of one model that can share a pipeline call
(the same ``JobRecord.batch`` key: ``jobs.batch_key``) run as one call of up to
``models.NAME.target_inflight`` jobs.

The forecast decides, not a timer: the head of the queue runs at once, with the
compatible jobs behind it that the planner (``batch_plan.plan_batch``) lets share
its call.

A job with nothing compatible queued runs at once: there is no waiting for
companions.  The claim of a batch is one broker step (``Broker.claim_batch``): it
takes nothing when a job the plan did not see has come ahead of a companion, and
the loop then claims the head alone.

Each job stays a job: its own ``JobContext`` fed from the one call
(``backends.base.BatchSteps``), its own cancel (its images are discarded while the
others finish), result and worker seconds (the call's, split by images); the
forecast learns the call once, from its own features (``batch_plan.batch_features``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ..backends.base import Backend, BatchSteps, batches
from ..batch_forecast import own_part
from ..batch_plan import WINDOW, Plan, job_seconds, plan_batch
from ..broker.base import Broker
from ..features import job_vector
from ..forecast import CostModel
from ..standing import Forecasts
from .batch_wait import Arrivals, deadline_slack, wait_seconds
from .execute import Inputs, prompt_tokens, work_item

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..config import Settings
    from ..jobs import JobRecord
    from ..registry import ModelState
    from .context import JobContext

log = logging.getLogger("easel")
class Batcher:
    """Claims a model's next jobs: a batch when the forecast says so, else one; with
    ``batch_wait_ms``, the head of an idle model's queue first waits for companions
    when the forecast says that pays (``batch_wait``)."""

    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.forecasts = Forecasts(settings, broker)
        self.planned: list[Plan] = []  # the batches this worker formed, newest last (a few kept: tests, the log)
        self.arrivals: dict[str, Arrivals] = {}  # per model
        self.waited: list[tuple[str, float]] = []  # (head, seconds it was to wait) of each wait begun, newest last (tests, the log)
        self._until: dict[str, tuple[str, float]] = {}  # model -> (head, broker time its wait ends at the latest)

    async def claim(self, ms: ModelState, worker: str, lease: float, timeout: float) -> list[JobRecord]:
        """The next jobs to run, or [] when none came (or the head waits: the caller
        claims again).  ``timeout``: 0 when the model has a job's results to store
        meanwhile (never waits then), else the longest to wait for work."""
        size = ms.cfg.target_inflight
        if size > 1 and ms.backend is not None and batches(ms.backend):
            wait_for = ms.cfg.batch_wait_ms / 1000 if timeout > 0 else 0.0
            seen = self.broker.submits(ms.name)  # before the read: no submit after it is missed
            waiting = await self.broker.waiting(ms.name, WINDOW)
            arrivals = self.arrivals.setdefault(ms.name, Arrivals())
            arrivals.saw(waiting)
            if not waiting and wait_for > 0:  # a job that comes may wait for companions: do not claim it blind
                await self.broker.wait_submitted(ms.name, timeout, seen)
                return []
            if waiting and waiting[0].batch:
                cost = await self.forecasts.cost(ms.name)
                now = self.broker.now()
                plan = plan_batch(waiting, cost, size, ms.cfg.batch_max_delay, now)
                if wait_for > 0 and (until := self._wait_until(ms, waiting, plan, cost, arrivals, now)) > now:
                    await self.broker.wait_submitted(ms.name, min(until - now, timeout), seen)
                    return []
                if plan is not None:
                    jobs = await self.broker.claim_batch(ms.name, worker, lease, plan.claim)
                    if jobs:
                        self.planned = [*self.planned[-15:], plan]
                        log.info("jobs %s on %s: one call of %d (forecast %.2fs, %.2fs one by one; overtaken jobs at most %.0f%% later)",
                                 ",".join(j.id for j in jobs), ms.name, len(jobs), plan.seconds, plan.in_order, 100 * plan.worst_delay)  # fmt: skip
                        return jobs
        job = await self.broker.claim(ms.name, worker, lease, timeout)
        return [job] if job is not None else []

    def _wait_until(self, ms: ModelState, waiting: list[JobRecord], plan: Plan | None, cost: CostModel, arrivals: Arrivals,
                    now: float) -> float:  # fmt: skip
        """Broker time until which the head waits for companions (``now`` or before: it runs now)."""
        head = waiting[0]
        members = len(plan.jobs) if plan is not None else 1
        seconds = [job_seconds(cost, j) for j in waiting]
        if plan is not None:  # the call's jobs finish together, then the others in order
            ids = {j.id for j in plan.jobs}
            seconds = [plan.seconds] + [0.0] * (members - 1) + [s for j, s in zip(waiting, seconds, strict=True) if j.id not in ids]
            waiting = [*plan.jobs, *(j for j in waiting if j.id not in ids)]
        part = own_part(cost, job_vector(head.task, np.asarray(head.features), head.batch))
        left = head.created_at + ms.cfg.batch_wait_ms / 1000 - now
        wait = wait_seconds(arrivals.rate(head.batch, now), part, members, len(waiting), ms.cfg.target_inflight, left,
                            deadline_slack(waiting, seconds, now))  # fmt: skip
        earlier = self._until.get(ms.name)
        if wait <= 0:
            self._until.pop(ms.name, None)
            return now
        until = now + wait
        if earlier is not None and earlier[0] == head.id:
            until = min(until, earlier[1])  # the first look bounds the wait: it never grows
        else:
            self.waited = [*self.waited[-15:], (head.id, wait)]
            log.info("job %s on %s: waits up to %.0f ms for companions (the forecast says it pays)", head.id, ms.name, 1000 * wait)
        self._until[ms.name] = (head.id, until)
        return until


def execute_batch(
    backend: Backend, jobs: list[JobRecord], ctxs: list[JobContext], blobs: dict[str, bytes], max_pixels: int
) -> tuple[list[list[Image]], list[bool], float]:
    """One pipeline call of compatible ``jobs`` (the model's thread): each job's
    images, whether it was dropped (cancelled during the call), and the call's seconds."""
    inputs = Inputs(blobs, max_pixels)
    items = []
    for job, ctx in zip(jobs, ctxs, strict=True):
        item = job.items[0]
        items.append(work_item(job.task, item, inputs))
        tokens, limit = prompt_tokens(backend, job, item.prompt)
        job.text_tokens, job.image_tokens = tokens, 0
        if limit is not None and tokens > limit:
            job.warnings = [
                f"the prompt is {tokens} tokens but the text encoder of model {job.model!r} takes {limit}: "
                f"the last {tokens - limit} tokens were cut; shorten the prompt"
            ]
            ctx.publish({"warnings": list(job.warnings)})
    times = [ctx.begin_call(item.run_steps) for item, ctx in zip(items, ctxs, strict=True)]
    steps = BatchSteps(list(ctxs))
    out = backend.run_batch(items, steps)  # type: ignore[attr-defined]
    for ctx in ctxs:
        ctx.end_call()
    first = times[0]
    return out, steps.dropped, (first.end or first.start) - first.start


def shares(jobs: list[JobRecord]) -> list[float]:
    """Each job's share of a call: its images over all."""
    images = [j.task_length for j in jobs]
    total = sum(images) or 1
    return [n / total for n in images]
