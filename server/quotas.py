"""Per-key quotas: unfinished jobs at once (``max_queued``) and GPU time per hour
(``gpu_seconds_per_hour``), counted in worker seconds.

At submission a job is booked at its forecast cost; once it has ended its booking
becomes what it measured (``JobRecord.gpu_seconds``: its worker time; nothing for a
job cancelled before it ran).  Bookings are settled lazily, when the key's ledger
is next read, from the job records themselves, so every way a job can end (done,
error, cancelled on any node, lost twice) settles it.  Over a limit: 429 with a
``Retry-After`` of when enough of the last hour's bookings will have aged out for
the job to fit (or when the key's first unfinished job is forecast to be done).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .errors import QuotaExceeded
from .jobs import JobRecord
from .standing import Forecasts, standing

if TYPE_CHECKING:
    from .auth import Caller

WINDOW = 3600.0  # gpu_seconds_per_hour: a sliding hour


def gpu_seconds(job: JobRecord) -> float:
    """The worker time a finished job used (what its owner is charged)."""
    if job.worker_seconds is not None:
        return job.worker_seconds
    if job.started_at is not None and job.finished_at is not None:
        return max(0.0, job.finished_at - job.started_at)
    return 0.0


async def check_and_charge(forecasts: Forecasts, caller: Caller, job: JobRecord) -> None:
    """Refuse ``job`` if it does not fit ``caller``'s quota; else book its forecast."""
    quota = caller.quota
    owner = caller.key_id
    if owner is None or (quota.max_queued is None and quota.gpu_seconds_per_hour is None):
        return
    broker = forecasts.broker
    now = broker.now()
    entries = []
    for job_id, at, seconds, open_ in await broker.ledger(owner, now - WINDOW):
        if open_:
            record = await broker.get(job_id)
            if record is None or record.status.finished:
                seconds = gpu_seconds(record) if record is not None else seconds
                await broker.settle(owner, job_id, seconds)
                open_ = False
        entries.append((job_id, at, seconds, open_))
    unfinished = [e for e in entries if e[3]]
    if quota.max_queued is not None and len(unfinished) >= quota.max_queued:
        raise QuotaExceeded(
            f"key {owner!r} already has {len(unfinished)} unfinished jobs, its max_queued; "
            "wait for one to finish (or cancel one)",
            retry_after=await _first_done(forecasts, [e[0] for e in unfinished]),
        )
    budget = quota.gpu_seconds_per_hour
    cost = job.predicted
    if budget is not None:
        if cost > budget:
            raise QuotaExceeded(
                f"this job is forecast to use {cost:.1f} GPU-seconds, more than key {owner!r}'s whole budget of "
                f"{budget:g} per hour (gpu_seconds_per_hour); ask for fewer or smaller images or fewer steps",
                retry_after=None,
            )
        recent = [e for e in entries if e[1] > now - WINDOW or e[3]]
        used = sum(e[2] for e in recent)
        if used + cost > budget:
            wait = WINDOW
            left = used
            for _, at, seconds, open_ in recent:  # oldest first: when does enough age out?
                if open_:
                    continue  # an unfinished job's booking stays until it ends
                left -= seconds
                if left + cost <= budget:
                    wait = at + WINDOW - now
                    break
            raise QuotaExceeded(
                f"key {owner!r} has used {used:.1f} of its {budget:g} GPU-seconds this hour and this job is forecast "
                f"at {cost:.1f}; retry in {math.ceil(wait)} s",
                retry_after=max(1.0, wait),
            )
    await broker.charge(owner, job.id, cost)


async def _first_done(forecasts: Forecasts, job_ids: list[str]) -> float:
    """Forecast seconds until the first of these jobs is done."""
    waits = []
    for job_id in job_ids:
        record = await forecasts.broker.get(job_id)
        if record is not None:
            where = await standing(forecasts, record)
            if where.wait is not None:
                waits.append(where.wait)
    return max(1.0, min(waits, default=60.0))
