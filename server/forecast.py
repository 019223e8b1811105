"""Duration model and ETA.

A job's cost is linear in a few features of what it is::

    seconds = c0 + c1 * steps*MP*n + c2 * refs*n + c3 * steps*MP*n*refs

(summed over the pipeline calls of the job).  The coefficients are learned per
model and task, online, by ridge regression that shrinks towards a prior (the
backend's own estimate or the config's ``forecast_prior``) and slowly forgets old
jobs so that the model follows a warming GPU or a changed setting.

The prior is first scaled to the jobs seen (by the ratio of their total time to
the prior's total forecast for them: a machine twice as fast as the prior assumed
halves every coefficient), then the fit shrinks towards that scaled prior with a
weight of ``ridge`` jobs, measured in the metric of the jobs seen (a "g-prior"):
with enough varied jobs the result is the least-squares fit moved ``ridge/(jobs +
ridge)`` of the way to the prior, whatever the units, so a 64 px, 2-step job
(``steps*MP*n`` ~ 0.01) learns as fast as a 1 MP, 30-step one.  What the jobs seen
cannot tell apart (after one job, or with a feature that never varied) stays in the
scaled prior's proportions.  (A plain ridge on each coefficient lets a far-off
prior tilt the line instead: over a narrow range of jobs the constant and the
per-step cost are nearly collinear, and trading one for the other costs the fit
almost nothing.)

Because the model is linear, the forecast for everything ahead of a job is the
coefficients times the *sum* of the features ahead, which the queue keeps as
prefix sums; no scan of the queue is needed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

TASKS: tuple[str, ...] = ("generate", "edit", "train", "upscale")
FEATURES: tuple[str, ...] = ("jobs", "steps_mp_n", "refs_n", "steps_mp_n_refs")
NF = len(FEATURES)
DIM = NF * len(TASKS)  # one block of features per task
WIDTH = DIM + 1  # a job vector: its task's features, then a count of one (jobs ahead = sum of vectors)
GENERIC_PRIOR = (0.5, 1.0, 0.5, 0.1)
MIN_PENALTY = 1e-9
FLOOR = 1e-3  # x each feature's mean square: what the jobs seen leave open stays at the scaled prior
EAGER_SAMPLES = 64  # refit after every one of a task's first jobs
REFIT_SECONDS = 0.1  # then at most this often (a solve per job costs more than the rest of the bookkeeping)


def features(steps: int, megapixels: float, n: int, refs: int) -> np.ndarray:
    work = steps * megapixels * n
    return np.array([1.0, work, refs * n, work * refs], dtype=np.float64)


def sum_features(per_call: list[np.ndarray]) -> np.ndarray:
    """A job's features: the sum over its pipeline calls (most jobs make one)."""
    return per_call[0] if len(per_call) == 1 else np.sum(per_call, axis=0)


def job_vector(task: str, feats: np.ndarray) -> np.ndarray:
    """The job's features placed in its task's block of a WIDTH vector, whose last
    component (a count of one job) the forecast gives no weight."""
    vec = np.zeros(WIDTH, dtype=np.float64)
    t = TASKS.index(task)
    vec[t * NF : (t + 1) * NF] = feats
    vec[DIM] = 1.0
    return vec


@dataclass
class _Fit:
    prior: np.ndarray
    a: np.ndarray
    b: np.ndarray
    coef: np.ndarray
    s: np.ndarray  # the forgetting-weighted sum of the feature vectors
    y_sum: float = 0.0  # and of the seconds
    samples: int = 0
    weight: float = 0.0  # the forgetting-weighted number of jobs in ``a`` and ``b``
    abs_pct_error_sum: float = 0.0


class CostModel:
    """Per-model forecaster: one ridge fit per task."""

    def __init__(self, priors: Mapping[str, Sequence[float]], *, ridge: float = 0.1, forget: float = 0.98) -> None:
        self._lock = threading.Lock()
        self.ridge = ridge
        self.forget = forget
        self._fits: dict[str, _Fit] = {}
        for task in TASKS:
            prior = np.array(priors.get(task, GENERIC_PRIOR), dtype=np.float64)
            self._fits[task] = _Fit(prior=prior, a=np.zeros((NF, NF)), b=np.zeros(NF), coef=prior.copy(), s=np.zeros(NF))
        self._stacked = np.concatenate([*(self._fits[t].coef for t in TASKS), [0.0]])  # 0: the count
        self._dirty: set[str] = set()
        self._fitted_at = 0.0

    def predict(self, vec: np.ndarray) -> float:
        """Seconds for a job vector, or for a sum of them (everything ahead of a job)."""
        if self._dirty:
            self._refit(force=False)
        return max(0.0, float(self._stacked @ vec))

    def observe(self, task: str, feats: np.ndarray, seconds: float, predicted: float | None = None) -> None:
        """Learn from a finished job that took ``seconds`` of worker time."""
        with self._lock:
            fit = self._fits[task]
            fit.a = self.forget * fit.a + np.outer(feats, feats)
            fit.b = self.forget * fit.b + feats * seconds
            fit.s = self.forget * fit.s + feats
            fit.y_sum = self.forget * fit.y_sum + seconds
            fit.weight = self.forget * fit.weight + 1.0
            fit.samples += 1
            if predicted is not None and seconds > 0:
                fit.abs_pct_error_sum += abs(predicted - seconds) / seconds
            self._dirty.add(task)
        # while it learns, refit after every job; later at most every REFIT_SECONDS
        self._refit(force=fit.samples <= EAGER_SAMPLES)

    def _refit(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._fitted_at < REFIT_SECONDS:
            return
        with self._lock:
            stacked = self._stacked.copy()  # readers on other threads keep a consistent vector
            for task in self._dirty:
                fit = self._fits[task]
                forecast = float(fit.s @ fit.prior)
                scaled = fit.prior * (fit.y_sum / forecast) if forecast > 0 and fit.y_sum > 0 else fit.prior
                gram = fit.a / fit.weight  # the jobs' mean outer product
                penalty = self.ridge * (gram + FLOOR * np.diag(np.diag(gram))) + MIN_PENALTY * np.eye(NF)
                fit.coef = np.linalg.solve(fit.a + penalty, fit.b + penalty @ scaled)
                t = TASKS.index(task)
                stacked[t * NF : (t + 1) * NF] = fit.coef
            self._dirty.clear()
            self._stacked = stacked
            self._fitted_at = now

    def report(self) -> dict[str, dict[str, object]]:
        """What the model has learned, for /api/ps and /health."""
        self._refit(force=True)
        out: dict[str, dict[str, object]] = {}
        for task, fit in self._fits.items():
            out[task] = {
                "coefficients": dict(zip(FEATURES, (round(float(c), 6) for c in fit.coef), strict=True)),
                "prior": dict(zip(FEATURES, (float(c) for c in fit.prior), strict=True)),
                "samples": fit.samples,
                "mean_abs_pct_error": round(fit.abs_pct_error_sum / fit.samples, 4) if fit.samples else None,
            }
        return out


def running_remaining(
    now: float,
    started_at: float,
    predicted: float,
    step: int,
    total_steps: int,
    last_step_at: float | None,
) -> float:
    """Seconds left for a running job.

    Before the first step: the prediction minus the time already spent.  After it:
    the job's own measured step rate times the steps still to go, minus the time
    since the last step.
    """
    if step <= 0 or last_step_at is None or total_steps <= 0:
        return max(0.0, predicted - (now - started_at))
    per_step = (last_step_at - started_at) / step
    left = per_step * (total_steps - step) - (now - last_step_at)
    return max(0.0, left)
