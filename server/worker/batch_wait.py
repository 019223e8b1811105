"""Waiting for companions (``models.NAME.batch_wait_ms``): the head of an idle
model's queue waits a little for compatible jobs to share its call, only when the
forecast says the wait pays.

A wait of w seconds delays every job waiting now (``delayed`` of them: the head,
its companions so far, the others) by w; each compatible job that arrives in it
and joins the call saves the call part of its own call (``batch_forecast.call_part``:
what a call costs beyond its images).  With compatible jobs arriving at a rate r
(per second) the wait saves r x w x part and costs w x delayed, so it pays when

    r x part > delayed

and then lasts until the call is expected full, ``(size - members) / r``, and never
past ``batch_wait_ms`` after the head was submitted, nor so long that a job meeting
its deadline in order would miss it.  A job with nothing compatible coming (r = 0:
no job of its class seen lately) runs at once; so does one on a busy model (it
waited while the model ran: the head's ``batch_wait_ms`` is spent, and the jobs
that came meanwhile are its companions).

The rate of a class is estimated from the arrivals (``created_at``, broker clock)
of its last ``RECENT`` jobs this worker has seen: (k - 1) / (now - the k-th last
arrival), which falls as time passes with none (a burst that ended stops the
waits).  Another worker's jobs go unseen: the rate errs low, and so the wait short.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..jobs import JobRecord

RECENT = 8  # arrivals per class the rate is estimated from
REMEMBERED = 512  # job ids remembered as seen (each arrival counts once)


class Arrivals:
    """Recent arrivals per batch class of one model, from the waiting jobs the worker reads."""

    def __init__(self) -> None:
        self._times: dict[str, deque[float]] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()

    def saw(self, jobs: list[JobRecord]) -> None:
        for job in jobs:
            if not job.batch or job.id in self._seen:
                continue
            self._seen[job.id] = None
            if len(self._seen) > REMEMBERED:
                self._seen.popitem(last=False)
            times = self._times.setdefault(job.batch, deque(maxlen=RECENT))
            times.append(job.created_at)
            if len(times) > 1 and times[-1] < times[-2]:  # seen out of order (a re-queued job): keep them sorted
                times = self._times[job.batch] = deque(sorted(times), maxlen=RECENT)

    def rate(self, batch: str, now: float) -> float:
        """Arrivals per second of class ``batch`` lately (0: none or one seen)."""
        times = self._times.get(batch)
        if not times or len(times) < 2:
            return 0.0
        span = now - times[0]
        return (len(times) - 1) / span if span > 0 else 0.0


def wait_seconds(
    rate: float, part: float, members: int, delayed: int, size: int, left: float, slack: float = float("inf")
) -> float:  # fmt: skip
    """How long the head waits for companions (0: not at all), see the module
    docstring: ``rate`` of compatible arrivals per second, ``part`` the seconds a
    companion saves, ``members`` of the call so far, ``delayed`` jobs waiting now,
    ``left`` of the head's ``batch_wait_ms``, ``slack`` before a deadline breaks."""
    if members >= size or rate <= 0 or part <= 0 or left <= 0 or slack <= 0:
        return 0.0
    if rate * part <= delayed:
        return 0.0
    return max(0.0, min(left, (size - members) / rate, slack))


def deadline_slack(waiting: list[JobRecord], seconds: list[float], now: float) -> float:
    """Seconds every waiting job that meets its deadline in order (job k done
    ``sum(seconds[:k + 1])`` from ``now``) can be delayed and still meet it."""
    slack = float("inf")
    for job, done in zip(waiting, np.cumsum(seconds), strict=False):
        if job.deadline_at is not None and now + done <= job.deadline_at:
            slack = min(slack, job.deadline_at - now - float(done))
    return slack
