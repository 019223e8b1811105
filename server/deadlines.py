"""Deadlines: a submit may say by when it must be done (``deadline_seconds`` or
``deadline_at``).

* At submission the job's forecast finish (what it would queue behind at its
  priority, the running jobs' remaining time, its own cost, over the model's live
  workers) is compared with the deadline: a miss is a 422 (``deadline_unreachable``)
  with the forecast finish and the earliest deadline that would do, and no job is
  made.  With no live worker there is no forecast, and the job is accepted.
* A queued job whose deadline can no longer be met (the queue got slower) ends as
  ``error`` with ``code: deadline_missed``, before it uses the GPU: when its status
  is read, and at the latest when a worker claims it.

Queue order stays priority, then arrival: a deadline is a promise checked, not a
scheduling class.
"""

from __future__ import annotations

import math

from .errors import DeadlineUnreachable
from .jobs import JobRecord, JobStatus
from .standing import Forecasts, Where, standing


async def refuse_unreachable(forecasts: Forecasts, job: JobRecord) -> None:
    """422 if ``job`` (not yet queued) is forecast to finish after its deadline."""
    if job.deadline_at is None:
        return
    where = await standing(forecasts, job)  # a job not queued: what it would queue behind
    if where.wait is None:
        return
    now = forecasts.broker.now()
    finish = now + where.wait
    if finish > job.deadline_at:
        earliest = now + math.ceil(where.wait * 1.1 + 0.5)  # a little room for the forecast's error
        raise DeadlineUnreachable(
            f"the job is forecast to be done in {where.wait:.1f} s ({where.pos} job(s) ahead), after its deadline "
            f"{job.deadline_at - now:.1f} s from now; allow at least {earliest - now:.0f} s, ask for less (steps, size, n), "
            "or raise its priority",
            forecast_finish_at=finish,
            earliest_deadline_at=earliest,
            now=now,
        )


def miss(job: JobRecord, now: float, wait: float) -> dict[str, object] | None:
    """The record fields that end ``job`` as a missed deadline, if finishing ``wait``
    seconds from ``now`` misses it."""
    if job.deadline_at is None or now + wait <= job.deadline_at:
        return None
    late = now + wait - job.deadline_at
    return {
        "message": f"deadline missed: the job was forecast to be done {late:.1f} s after its deadline, so it did not run",
        "code": "deadline_missed",
    }


async def end_if_missed(forecasts: Forecasts, job: JobRecord, where: Where) -> JobRecord:
    """A waiting job that can no longer make its deadline ends now (never on the GPU)."""
    if where.wait is None:
        return job
    fields = miss(job, forecasts.broker.now(), where.wait)
    if fields is not None and await forecasts.broker.finish(job, JobStatus.ERROR, fields, attempt=None, blobs={}, only_waiting=True):
        return await forecasts.broker.get(job.id) or job
    return job
