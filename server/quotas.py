"""Per-key quotas: unfinished jobs at once (``max_queued``) and GPU time per hour
(``gpu_seconds_per_hour``), counted in worker seconds.

The broker decides them in the step that queues the job (``broker.base.Admission``:
the Redis submit script, the memory broker's submit), so two API nodes, or two
requests at once, can never let a key past a limit.  A queued job is booked at its
forecast cost and counts as unfinished; every step that ends it (done, error,
cancelled on any node, a missed deadline, lost twice) releases it and settles its
booking at what it measured (``JobRecord.gpu_seconds``: its worker time; nothing for
a job cancelled before it ran); a job requeued after a lost lease is still the one
booking.  Over a limit: 429 with a ``Retry-After`` of when enough of the last hour's
bookings will have aged out for the job to fit (or when the key's first unfinished
job is forecast to be done).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .broker.base import Admission, QuotaRefused
from .broker.memory_accounts import gpu_seconds
from .errors import QuotaExceeded
from .jobs import JobRecord
from .standing import Forecasts, standing

if TYPE_CHECKING:
    from .auth import Caller

WINDOW = 3600.0  # gpu_seconds_per_hour: a sliding hour
__all__ = ["WINDOW", "admission", "exceeded", "gpu_seconds"]  # gpu_seconds: the one rule, shared with the brokers


def admission(caller: Caller, job: JobRecord) -> Admission | None:
    """What the broker is to decide for ``job`` (None: ``caller`` has no quota); a job
    forecast at more than the whole hourly budget is refused here, for good."""
    quota = caller.quota
    owner = caller.key_id
    if owner is None or (quota.max_queued is None and quota.gpu_seconds_per_hour is None):
        return None
    budget = quota.gpu_seconds_per_hour
    if budget is not None and job.predicted > budget:
        raise QuotaExceeded(
            f"this job is forecast to use {job.predicted:.1f} GPU-seconds, more than key {owner!r}'s whole budget of "
            f"{budget:g} per hour (gpu_seconds_per_hour); ask for fewer or smaller images or fewer steps",
            retry_after=None,
        )
    return Admission(owner=owner, cost=job.predicted, max_queued=quota.max_queued, budget=budget, window=WINDOW)


async def exceeded(forecasts: Forecasts, adm: Admission, refusal: QuotaRefused) -> QuotaExceeded:
    """The 429 for the broker's ``refusal`` of ``adm``."""
    owner = adm.owner
    if refusal.limit == "max_queued":
        return QuotaExceeded(
            f"key {owner!r} already has {refusal.used:g} unfinished jobs, its max_queued; wait for one to finish (or cancel one)",
            retry_after=await _first_done(forecasts, refusal.jobs),
        )
    return QuotaExceeded(
        f"key {owner!r} has used {refusal.used:.1f} of its {adm.budget:g} GPU-seconds this hour and this job is "
        f"forecast at {adm.cost:.1f}; retry in {math.ceil(max(1.0, refusal.wait))} s",
        retry_after=max(1.0, refusal.wait),
    )


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
