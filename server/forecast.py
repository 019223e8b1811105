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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

TASKS: tuple[str, ...] = ("generate", "edit", "train", "upscale")
FEATURES: tuple[str, ...] = ("jobs", "steps_mp_n", "refs_n", "steps_mp_n_refs")
NF = len(FEATURES)
DIM = NF * len(TASKS)  # one block of features per task
WIDTH = DIM + 1  # a job vector: its task's features, then a count of one (jobs ahead = sum of vectors)
GENERIC_PRIOR = (0.5, 1.0, 0.5, 0.1)
FORGET = 0.98  # each finished job weighs old ones down by this: the fit follows a warming GPU
MIN_PENALTY = 1e-9
FLOOR = 1e-3  # x each feature's mean square: what the jobs seen leave open stays at the scaled prior


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


# a task's statistics as one flat vector, so that a broker can keep them (and add a
# job's contribution atomically, as Redis does in a script): the forgetting-weighted
# sums first, then the plain counters
DECAYED = NF * NF + NF + NF + 2  # A = sum f f^T, b = sum f y, s = sum f, sum y, weight (jobs)
ADDED = 2  # samples, sum of |predicted - seconds| / seconds
STATS = DECAYED + ADDED


def observation(feats: np.ndarray, seconds: float, predicted: float | None) -> tuple[list[float], list[float]]:
    """One finished job's contribution to its task's statistics: (decayed, added)."""
    decayed = np.concatenate([np.outer(feats, feats).ravel(), feats * seconds, feats, [seconds, 1.0]])
    error = abs(predicted - seconds) / seconds if predicted is not None and seconds > 0 else 0.0
    return decayed.tolist(), [1.0, error]


def apply(stats: np.ndarray, decayed: list[float], added: list[float], forget: float) -> np.ndarray:
    """``stats`` after one observation (what the brokers' ``observe_cost`` computes)."""
    out = stats.copy()
    out[:DECAYED] = forget * out[:DECAYED] + np.asarray(decayed)
    out[DECAYED:] += np.asarray(added)
    return out


@dataclass
class _Fit:
    prior: np.ndarray
    stats: np.ndarray
    coef: np.ndarray

    @property
    def samples(self) -> int:
        return int(self.stats[DECAYED])

    def solve(self, ridge: float) -> None:
        st = self.stats
        a = st[: NF * NF].reshape(NF, NF)
        b = st[NF * NF : NF * NF + NF]
        s = st[NF * NF + NF : NF * NF + 2 * NF]
        y_sum, weight = st[DECAYED - 2], st[DECAYED - 1]
        if weight <= 0:
            self.coef = self.prior.copy()
            return
        forecast = float(s @ self.prior)
        scaled = self.prior * (y_sum / forecast) if forecast > 0 and y_sum > 0 else self.prior
        gram = a / weight  # the jobs' mean outer product
        penalty = ridge * (gram + FLOOR * np.diag(np.diag(gram))) + MIN_PENALTY * np.eye(NF)
        self.coef = np.linalg.solve(a + penalty, b + penalty @ scaled)


class CostModel:
    """Per-model forecaster: one ridge fit per task, over statistics that a broker
    keeps (``load``) or that it gathers itself (``observe``)."""

    def __init__(self, priors: Mapping[str, Sequence[float]], *, ridge: float = 0.1, forget: float = FORGET) -> None:
        self.ridge = ridge
        self.forget = forget
        self._fits: dict[str, _Fit] = {}
        for task in TASKS:
            prior = np.array(priors.get(task, GENERIC_PRIOR), dtype=np.float64)
            self._fits[task] = _Fit(prior=prior, stats=np.zeros(STATS), coef=prior.copy())
        self._stacked = np.zeros(WIDTH)
        self._restack()

    def predict(self, vec: np.ndarray) -> float:
        """Seconds for a job vector, or for a sum of them (everything ahead of a job)."""
        return max(0.0, float(self._stacked @ vec))

    def observe(self, task: str, feats: np.ndarray, seconds: float, predicted: float | None = None) -> None:
        """Learn from a finished job that took ``seconds`` of worker time."""
        fit = self._fits[task]
        fit.stats = apply(fit.stats, *observation(feats, seconds, predicted), self.forget)
        fit.solve(self.ridge)
        self._restack()

    def load(self, stats: Mapping[str, Sequence[float]]) -> None:
        """Take the statistics a broker keeps (``Broker.cost_stats``) and refit."""
        for task, values in stats.items():
            fit = self._fits.get(task)
            if fit is not None and len(values) == STATS:
                fit.stats = np.asarray(values, dtype=np.float64)
                fit.solve(self.ridge)
        self._restack()

    def _restack(self) -> None:
        stacked = np.zeros(WIDTH)  # the last entry (the count) gets no weight
        for t, task in enumerate(TASKS):
            stacked[t * NF : (t + 1) * NF] = self._fits[task].coef
        self._stacked = stacked  # one store: readers see the old vector or the new one

    def report(self) -> dict[str, dict[str, object]]:
        """What the model has learned, for /api/ps and /health."""
        out: dict[str, dict[str, object]] = {}
        for task, fit in self._fits.items():
            samples = fit.samples
            out[task] = {
                "coefficients": dict(zip(FEATURES, (round(float(c), 6) for c in fit.coef), strict=True)),
                "prior": dict(zip(FEATURES, (float(c) for c in fit.prior), strict=True)),
                "samples": samples,
                "mean_abs_pct_error": round(float(fit.stats[DECAYED + 1]) / samples, 4) if samples else None,
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
