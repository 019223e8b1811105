"""The forecast of queued jobs with the batching they will get, counted from the
queue's sums: for a job further back than the planner looks (``batch_plan.WINDOW``);
nearer the head, ``standing`` replays the planner itself (``batch_plan.replay``).

The worker runs compatible jobs (one ``JobRecord.batch`` class) as one pipeline call
of up to ``size`` = ``target_inflight`` jobs (worker/batch.py).  In the linear cost
model a call of b such jobs has the features of the b jobs run one by one less
(b - 1) times one job's *call part*: the terms paid once per call, not per image
(``job``, ``after_job`` and ``finish`` once, ``step`` per step, and
``decode_batch_mp``, which a call pays for each image after its first).  So the
seconds a class saves are (its jobs - its calls) x the call part's seconds, which
needs only the class's jobs, their steps and their megapixels per image: each job's
queue vector carries them in its class's bucket (``forecast.job_vector``), and the
queue's sums ahead of a job give them per bucket.  Nothing scans the queue: a
forecast is O(``BUCKETS``).

For a waiting job J with the sums ahead of it:

* every class ahead forms ceil(n / size) calls, J's class counted with J;
* J finishes with its call: the jobs of its class ahead of it that share the call
  (n mod size of them), J, and compatible jobs behind J that fill the call up to
  ``size`` (``behind``: from the queue's total, a second O(levels) read);
* what runs before J's call is divided among the live slots, as without batching.

Errors of the approximation (the worker plans from the head of the queue, in order;
the count sees only how many jobs of each class are ahead):

* classes interleaved so that a batch would overtake a job by more than
  ``batch_max_delay``: the worker forms fewer, smaller calls than ceil(n / size):
  the forecast is early by at most one call part per job ahead that does not batch;
* a job that joins a call of jobs ahead of others (overtaking them) is forecast
  after those it overtakes (late by at most their seconds), and they are forecast
  without its images in the call (early by at most ``size`` - 1 images);
* the last, partial call of a class ahead is filled by compatible jobs behind J
  when there are some: their images are not counted (early by at most ``size`` - 1
  images per class ahead);
* two classes hashed into one bucket (``BUCKETS`` = 16: with k classes queued, a
  collision is about as likely as k(k - 1)/32) count as one: early by at most one
  call part per job of the smaller class;
* the planner looks at ``WINDOW`` waiting jobs behind the head: jobs of one class
  further apart than that never share a call (early, as for interleaved classes).

With one class queued (many users of one model at its default settings) none of
these applies: the forecast is the cost model's own error (tests/test_batching.py
checks it against measured finishes on the stub).
"""

from __future__ import annotations

import numpy as np

from .features import BATCH, BUCKETS
from .forecast import CostModel

COUNTS = slice(BATCH, BATCH + 3 * BUCKETS, 3)  # per bucket: jobs
STEPS = slice(BATCH + 1, BATCH + 3 * BUCKETS, 3)  # their steps, summed
MPS = slice(BATCH + 2, BATCH + 3 * BUCKETS, 3)  # their megapixels per image, summed


def call_part(cost: CostModel, jobs: np.ndarray, steps: np.ndarray, mps: np.ndarray) -> np.ndarray:
    """Seconds of the call part of ``jobs`` jobs with ``steps`` steps and ``mps``
    megapixels per image in all (per bucket; never below zero: a class whose calls
    share nothing is not batched)."""
    per_call = sum(cost.term("generate", t) for t in ("job", "after_job", "finish"))
    part = jobs * per_call + steps * cost.term("generate", "step") - mps * cost.term("generate", "decode_batch_mp")
    return np.maximum(part, 0.0)


def saved(cost: CostModel, vec: np.ndarray, size: int) -> float:
    """Seconds the jobs summed in ``vec`` save when each class runs as calls of up to
    ``size`` jobs, in order (ceil(n / size) calls of n jobs)."""
    if size < 2 or len(vec) <= BATCH:
        return 0.0
    jobs = np.rint(vec[COUNTS])  # sums of ones, less the jobs gone: whole up to float drift
    some = jobs > 0
    if not some.any():
        return 0.0
    calls = np.ceil(jobs[some] / size)
    part = call_part(cost, jobs[some], vec[STEPS][some], vec[MPS][some])
    return float(np.sum(part * (jobs[some] - calls) / jobs[some]))


def queue_seconds(cost: CostModel, vec: np.ndarray, size: int) -> float:
    """Seconds of the calls the jobs summed in ``vec`` form."""
    return max(0.0, cost.predict(vec) - saved(cost, vec, size))


def class_of(vec: np.ndarray) -> int | None:
    """The bucket of a job's own vector, or None (a job that is never batched)."""
    if len(vec) <= BATCH:
        return None
    hit = np.flatnonzero(vec[COUNTS])
    return int(hit[0]) if len(hit) else None


def own_part(cost: CostModel, own: np.ndarray) -> float:
    """Seconds of the call part of one job's vector (0 for a job never batched):
    what it saves by joining another's call."""
    b = class_of(own)
    return 0.0 if b is None else float(call_part(cost, own[COUNTS][b], own[STEPS][b], own[MPS][b]))


def ahead_in_call(ahead: np.ndarray, own: np.ndarray, size: int) -> int:
    """How many jobs of ``own``'s class ahead of it share its call (0 when it is not batched)."""
    b = class_of(own)
    if b is None or size < 2:
        return 0
    return int(round(ahead[COUNTS][b])) % size


def behind(total: np.ndarray, ahead: np.ndarray, own: np.ndarray, queued: bool) -> int:
    """Jobs of ``own``'s class (bucket) queued behind it, from the queue's ``total``."""
    b = class_of(own)
    if b is None:
        return 0
    return max(0, int(round(total[COUNTS][b] - ahead[COUNTS][b])) - (1 if queued else 0))


def waiting_seconds(cost: CostModel, ahead: np.ndarray, own: np.ndarray, size: int, companions: int = 0) -> tuple[float, float]:
    """(seconds of the calls before the job's own, seconds of its own call) for a job
    of vector ``own`` queued behind ``ahead``, with ``companions`` compatible jobs
    behind it to fill its call (see the module docstring)."""
    alone = cost.predict(own)
    b = class_of(own)
    with_own = ahead + own
    total = queue_seconds(cost, with_own, size)
    if b is None or size < 2:
        return max(0.0, total - alone), alone
    part = own_part(cost, own)
    if part <= 0:  # its calls share nothing: it runs alone
        return max(0.0, total - alone), alone
    per_job = max(0.0, alone - part)  # its images' seconds (the others of its call: as many)
    r = ahead_in_call(ahead, own, size)
    fill = min(size - 1 - r, max(0, companions))
    return max(0.0, total - alone - r * per_job), alone + (r + fill) * per_job

