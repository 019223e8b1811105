"""The batch planner: which compatible jobs behind the head of a model's queue share
its pipeline call (``plan_batch``), and the calls a queue will run as, one after
another (``replay``).  The worker claims what ``plan_batch`` plans
(``worker/batch.py``); the forecast of a job near the head replays the same plans
(``standing``), so a job's forecast includes the batches that will overtake it and
the one it joins.

The forecast decides, not a timer.  A compatible job behind the head joins the call
only when the forecast says that

* the call costs less than running its jobs one after the other (a gain), and
* every waiting job it overtakes (queued between the head and it, not in the call)
  finishes no more than ``batch_max_delay`` (a fraction) later than it would have
  with the jobs run in order, and
* no job of the call, and none it overtakes, misses a deadline it would have met
  in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .broker.base import BatchPlan
from .features import job_vector
from .forecast import AFTER_JOB, FIRST_CALL, CostModel, call_features

if TYPE_CHECKING:
    from .jobs import JobRecord

WINDOW = 32  # waiting jobs the planner looks at behind the head


def batch_features(jobs: list[JobRecord], after_job: float | None = None, first_call: float = 0.0) -> np.ndarray:
    """The forecast's features of one call running ``jobs`` (compatible generates of
    one item each): one call of all their images."""
    item = jobs[0].items[0]
    feats = call_features("generate", item.run_steps, item.megapixels, sum(j.items[0].n for j in jobs))
    head = jobs[0].features
    feats[AFTER_JOB] = head[AFTER_JOB] if after_job is None and len(head) > AFTER_JOB else (after_job or 0.0)
    feats[FIRST_CALL] = first_call
    return feats


def job_seconds(cost: CostModel, job: JobRecord) -> float:
    """Forecast seconds of ``job`` run alone (its call's features, or what it was forecast at submission)."""
    return cost.predict(job_vector(job.task, np.asarray(job.features))) if job.features else job.predicted


@dataclass
class Plan:
    """A planned batch, with what the forecast said of it (tests and the log)."""

    jobs: list[JobRecord]
    window: list[str]
    seconds: float  # forecast seconds of the one call
    in_order: float  # forecast seconds of its jobs one after the other
    worst_delay: float  # the largest (batched - in order) / in order finish of a job it overtakes

    @property
    def claim(self) -> BatchPlan:
        return BatchPlan(head=self.jobs[0].id, ids=[j.id for j in self.jobs[1:]], window=self.window)


def plan_batch(
    waiting: list[JobRecord], cost: CostModel, size: int, max_delay: float, now: float, own: list[float] | None = None
) -> Plan | None:
    """The batch to form from the head of ``waiting`` (run order), or None: the head
    runs alone (see the module docstring).  ``now``: the broker's clock; ``own``: each
    job's ``job_seconds`` when the caller has them."""
    if size < 2 or len(waiting) < 2 or not waiting[0].batch:
        return None
    head = waiting[0]
    if own is None:
        own = [job_seconds(cost, j) for j in waiting]
    chosen, skipped = [head], []  # skipped: (index, job) of the jobs overtaken so far
    seconds = in_order = own[0]
    worst = 0.0
    for k in range(1, len(waiting)):
        if len(chosen) >= size:
            break
        job = waiting[k]
        if job.batch != head.batch:
            skipped.append(k)
            continue
        trial = cost.predict(job_vector("generate", batch_features([*chosen, job])))
        if trial >= seconds + own[k]:  # no gain: the call costs what the jobs cost one by one
            break
        fits, delay = _holds(waiting, own, [*chosen, job], skipped, trial, max_delay, now)
        if not fits:
            break
        chosen.append(job)
        seconds, in_order, worst = trial, in_order + own[k], max(worst, delay)
    if len(chosen) < 2:
        return None
    last = waiting.index(chosen[-1])
    return Plan(chosen, [j.id for j in waiting[: last + 1]], seconds, in_order, worst)


def _holds(
    waiting: list[JobRecord], own: list[float], members: list[JobRecord], skipped: list[int], seconds: float, max_delay: float,
    now: float,
) -> tuple[bool, float]:  # fmt: skip
    """Whether a call of ``members`` (``seconds``) keeps every overtaken job within ``max_delay`` and every deadline; and the
    largest relative delay it gives."""
    ahead = np.cumsum(own)  # in order: job k finishes ahead[k] from now
    worst = 0.0
    pushed = 0.0  # seconds of overtaken jobs ahead of the next one
    for k in skipped:
        pushed += own[k]
        batched, in_order = seconds + pushed, float(ahead[k])
        delay = (batched - in_order) / in_order if in_order > 0 else 0.0
        if delay > max_delay or _breaks(waiting[k], now + batched, now + in_order):
            return False, delay
        worst = max(worst, delay)
    for j, member in enumerate(members):
        index = 0 if j == 0 else waiting.index(member)
        if _breaks(member, now + seconds, now + float(ahead[index])):
            return False, worst
    return True, worst


def _breaks(job: JobRecord, batched: float, in_order: float) -> bool:
    """A deadline the job meets in order and misses batched."""
    return job.deadline_at is not None and batched > job.deadline_at >= in_order


def replay(waiting: list[JobRecord], cost: CostModel, size: int, max_delay: float, now: float) -> dict[str, tuple[float, float]]:
    """Each job of ``waiting`` (run order, the head first) -> (seconds from the model's
    next claim until its call starts, seconds of its call): the calls the worker will
    run if nothing comes ahead of them, planned as it plans them, one after another.
    O(jobs x ``size``) forecasts."""
    own = {j.id: job_seconds(cost, j) for j in waiting}
    rest, t = list(waiting), 0.0
    out: dict[str, tuple[float, float]] = {}
    while rest:
        plan = plan_batch(rest, cost, size, max_delay, now + t, [own[j.id] for j in rest])
        call, seconds = (plan.jobs, plan.seconds) if plan is not None else ([rest[0]], own[rest[0].id])
        for j in call:
            out[j.id] = (t, seconds)
        t += seconds
        taken = {j.id for j in call}
        rest = [j for j in rest if j.id not in taken]
    return out
