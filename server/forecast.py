"""Duration model and ETA.

A pipeline call has three phases, and each has costs of its own::

    before the steps   job + reference * refs + reference_mp * ref_MP (+ after_job)
                       (+ first_call)
                       (text encoding, VAE encoding of the references, set-up; a job
                       run right after another shares the CPU with storing its results;
                       the first job after a load pays the pipeline's one-time set-up)
    the steps          steps * (step + step_mp * MP*n + step_image * n + step_reference * refs*n
                                + step_reference_mp * ref_MP*n)
                       (+ edit_step, edit_step_mp: what an edit's steps cost more or less,
                       e.g. img2img runs only strength x steps)
    after the steps    finish + decode_mp * MP*n + decode_batch_mp * MP*(n-1)
                       (VAE decoding, post-processing; decode_batch_mp: what each image
                       after the first of a batch costs more or less)

A job's seconds are the sum over its calls: linear in the ``TERMS``' features, with
one coefficient each, learned per model online.  The worker measures the phases of
every job it runs (``timing.measured_phases``: the step callbacks time the
denoising: the median gap between steps times the steps; after the last step is the
tail; the rest is the head), so
each phase is fitted to its own measured seconds rather than the total alone: the
per-job constant, the per-step cost and the decode cost no longer trade off against
each other over a narrow range of jobs.  A job whose steps cannot be timed (fewer
than two steps) teaches the total.  So does the first job after a load: its excess
(allocations, kernel and cache set-up, lazy initialisation, in every phase) lands in
``first_call``, the one term only such jobs have, instead of raising every job's
head and tail.  Generates and edits of a model share one fit
(``FITS``: an edit is a generate plus its references); training and upscaling have
their own.

The fit is ridge regression shrunk towards a prior (the backend's own estimate, the
config's ``forecast_prior``, or ``GENERIC_PRIOR``), forgetting old jobs slowly so
that it follows a warming GPU or a changed setting.  The prior is first scaled to
the jobs seen, phase by phase (a machine twice as fast as the prior assumed halves
every term), then the fit shrinks towards that scaled prior with a weight of
``ridge`` jobs in the metric of the jobs seen (a "g-prior"): with enough varied jobs
it is the least-squares fit, whatever the units, and what the jobs seen cannot tell
apart (after one job, or a feature that never varied) stays in the scaled prior's
proportions.

Because the model is linear, the forecast for everything ahead of a job is the
coefficients times the *sum* of the features ahead, which the queue keeps as prefix
sums; no scan of the queue is needed.  The jobs of one batch class (``JobRecord.batch``)
run as calls of up to ``target_inflight`` (worker/batch.py), so a job's vector also
counts it in its class's bucket (``BUCKETS``, hashed: jobs, steps, megapixels per
image): from the sums ahead, a queued job's forecast counts ceil(n / target_inflight)
calls per class instead of n, each call's part paid once (``batch_forecast``).  The
approximation: every class's jobs ahead form full calls in queue order, a job's own
call is filled by compatible jobs behind it (their images counted as its own), two
classes in one bucket count as one.  Its error: with one class queued, none beyond
the fit's (the calls are the ones the worker plans); what the sums cannot see is the
order: classes interleaved so that ``batch_max_delay`` stops a batch are forecast up
to one call part per job ahead early, a job that will join a call overtaking others
up to their seconds late, a class's last call ahead without the images of the jobs
behind that fill it (up to ``target_inflight`` - 1 images early); a bucket collision
is early by up to one call part per job of the smaller class.

A job is done when its results are stored, a little after it leaves the model; that
storing overlaps the next job's run, so it is no part of what a job costs the jobs
behind it, only of the job's own forecast (``storing_line``: a line in the output's
megapixels over the jobs timed, kept with each fit's statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .features import (
    DECAYED,
    FEATURES,
    FITS,
    MASKS,
    NF,
    OUTPUT_MP,
    SIGNED,
    STATS,
    STORING,
    TASKS,
    TERMS,
    WEIGHT,
    WIDTH,
    Y_SUM,
    apply,
    fit_of,
    unknown_terms,
)

GENERIC_PRIOR: dict[str, float] = {
    "job": 0.3, "after_job": 0.01, "first_call": 0.3, "reference": 0.05, "reference_mp": 0.5, "step": 0.01, "step_mp": 1.0, "step_image": 0.005,
    "step_reference_mp": 0.5, "finish": 0.02, "decode_mp": 0.3,
}  # fmt: skip
FORGET = 0.98  # each finished job weighs old ones down by this: the fit follows a warming GPU
MIN_PENALTY = 1e-9
FLOOR = 1e-3  # x each feature's mean square: what the jobs seen leave open stays at the scaled prior
PHASE_RIDGE = 0.1  # how strongly each phase's prior scale is held to the common one (a fraction of the data)


def prior_vector(prior: Mapping[str, float] | Sequence[float]) -> np.ndarray:
    """A prior as a vector over ``FEATURES``: a mapping of term names to seconds
    (missing terms are 0), or a list in ``FEATURES`` order."""
    if isinstance(prior, Mapping):
        if unknown := unknown_terms(prior):
            raise ValueError(f"unknown forecast terms {unknown}; the terms are {', '.join(FEATURES)}")
        return np.array([float(prior.get(name, 0.0)) for name in FEATURES], dtype=np.float64)
    if len(prior) != NF:
        raise ValueError(f"a forecast prior lists {NF} terms ({', '.join(FEATURES)}), not {len(prior)}")
    return np.asarray(prior, dtype=np.float64)


def call_features(task: str, steps: int, megapixels: float, n: int, reference_mps: Sequence[float] = ()) -> np.ndarray:
    """The features of one pipeline call: ``n`` images of ``megapixels`` in ``steps``
    steps, with reference images of ``reference_mps`` megapixels each."""
    work = steps * megapixels * n
    ref = float(sum(reference_mps))
    edit = 1.0 if task == "edit" else 0.0
    return np.array(
        [1.0, len(reference_mps), ref, 0.0, 0.0, steps, work, steps * n, steps * len(reference_mps) * n, steps * ref * n, edit * steps, edit * work,
         1.0, megapixels * n, megapixels * (n - 1)],  # fmt: skip
        dtype=np.float64,
    )


AFTER_JOB = FEATURES.index("after_job")
FIRST_CALL = FEATURES.index("first_call")


def with_after_job(feats: np.ndarray | Sequence[float], after: bool, first_call: bool = False) -> np.ndarray:
    """``feats`` of a job that runs right after another (``after``) or not, and that is
    the first after its model loaded (``first_call``) or not: a queued job is forecast
    as one right after another and not the first (``job_features``), a finished one
    learns what it was."""
    out = np.array(feats, dtype=np.float64)
    if len(out) == NF:
        out[AFTER_JOB] = 1.0 if after else 0.0
        out[FIRST_CALL] = 1.0 if first_call else 0.0
    return out


def sum_features(per_call: list[np.ndarray]) -> np.ndarray:
    """A job's features: the sum over its pipeline calls (most jobs make one)."""
    return per_call[0] if len(per_call) == 1 else np.sum(per_call, axis=0)


def observation(
    feats: np.ndarray, seconds: float, predicted: float | None, phases: tuple[float, float, float] | None = None,
    stored: float | None = None,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """One finished job's contribution to its fit's statistics: (decayed, added).
    With measured ``phases`` each phase is a row of its own (its features only, its
    seconds); without, the job's total is one row.  The first job after a load is
    always one row: its one-time excess, spread over every phase, is left to
    ``first_call`` alone.  ``stored``: the seconds from the job leaving the model to
    its results stored (``storing_seconds``)."""
    first = len(feats) == NF and feats[FIRST_CALL] > 0  # its storing was a first too
    if first:
        phases = None
    rows = [(MASKS[p] * feats, y) for p, y in enumerate(phases)] if phases is not None else [(feats, seconds)]
    a = sum(np.outer(f, f) for f, _ in rows)
    b = sum(f * y for f, y in rows)
    x = float(feats[OUTPUT_MP]) if len(feats) == NF else 0.0
    store = [1.0, x, x * x, stored, x * stored] if stored is not None and not first else [0.0] * 5
    decayed = np.concatenate([np.ravel(a), b, feats, [seconds, 1.0], store])
    total = seconds + (stored or 0.0)  # what the job's own forecast was for
    error = abs(predicted - total) / total if predicted is not None and total > 0 else 0.0
    return decayed.tolist(), [1.0, error]


def storing_line(stats: np.ndarray) -> tuple[float, float]:
    """(seconds, seconds per output megapixel) from a job leaving the model to its
    results stored (encoding, writing): least squares over the jobs timed, through
    the origin when their sizes hardly differ or the line would start below zero."""
    n, sx, sxx, st, sxt = (float(v) for v in stats[STORING : STORING + 5])
    if n <= 0:
        return 0.0, 0.0
    mean_x, mean_t = sx / n, st / n
    if sx <= 0:
        return mean_t, 0.0
    per_mp = st / sx  # the line through the origin
    var = sxx / n - mean_x**2
    if var <= 1e-6 * sxx / n:
        return 0.0, per_mp
    slope = (sxt / n - mean_x * mean_t) / var
    base = mean_t - slope * mean_x
    if slope < 0:
        return mean_t, 0.0
    if base < 0:
        return 0.0, per_mp
    return base, slope


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
        s = st[NF * NF + NF : Y_SUM]
        y_sum, weight = st[Y_SUM], st[WEIGHT]
        if weight <= 0:
            self.coef = self.prior.copy()
            return
        scaled = self.prior * (MASKS.T @ phase_scales(self.prior, a, b, s, y_sum))
        gram = a / weight  # the jobs' mean outer product
        penalty = ridge * (gram + FLOOR * np.diag(np.diag(gram))) + MIN_PENALTY * np.eye(NF)
        self.coef = nonnegative_solve(a + penalty, b + penalty @ scaled)


def nonnegative_solve(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``m x = v`` with no cost below zero (but the ``signed`` terms): a term the fit
    would make negative (near-collinear features trading off against each other over
    the jobs seen) is held at zero and the others are solved again, most negative first."""
    free = np.ones(len(v), dtype=bool)
    x = np.zeros(len(v))
    while free.any():
        x[:] = 0.0
        x[free] = np.linalg.solve(m[np.ix_(free, free)], v[free])
        negative = free & ~SIGNED & (x < 0)
        if not negative.any():
            break
        free[int(np.argmin(np.where(negative, x, np.inf)))] = False
    return x


def phase_scales(prior: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray, y_sum: float) -> np.ndarray:
    """How much to scale the prior of each phase to fit the jobs seen: the least
    squares of one factor per phase, held towards the common factor (all jobs' time
    over the prior's forecast for them) where the jobs cannot tell the phases apart."""
    forecast = float(s @ prior)
    common = y_sum / forecast if forecast > 0 and y_sum > 0 else 1.0
    u = MASKS * prior  # phase x feature: the prior of each phase
    m = u @ a @ u.T
    v = u @ b
    hold = PHASE_RIDGE * np.diag(m) + MIN_PENALTY
    scales = np.linalg.solve(m + np.diag(hold), v + hold * common)
    return np.where(scales > 0, scales, common)  # a phase never costs less than nothing


class CostModel:
    """Per-model forecaster: one ridge fit per ``FITS`` entry, over statistics that a
    broker keeps (``load``) or that it gathers itself (``observe``)."""

    def __init__(
        self, priors: Mapping[str, Mapping[str, float] | Sequence[float]], *, ridge: float = 0.1, forget: float = FORGET
    ) -> None:
        self.ridge = ridge
        self.forget = forget
        self._fits: dict[str, _Fit] = {}
        for name in FITS:
            prior = prior_vector(priors.get(name, GENERIC_PRIOR))
            self._fits[name] = _Fit(prior=prior, stats=np.zeros(STATS), coef=prior.copy())
        self._stacked = np.zeros(WIDTH)
        self._restack()

    def predict(self, vec: np.ndarray) -> float:
        """Seconds for a job vector, or for a sum of them (everything ahead of a job)."""
        return max(0.0, float(self._stacked @ vec))

    def term(self, task: str, name: str) -> float:
        """The learned seconds of one term of ``task``'s fit."""
        return float(self._fits[fit_of(task)].coef[FEATURES.index(name)])

    def storing(self, task: str, feats: np.ndarray) -> float:
        """Forecast seconds from the job leaving the model to its results stored.  Not
        part of ``predict``: a job's storing overlaps the next job's run, so it counts
        once, for the job itself."""
        if len(feats) != NF:
            return 0.0
        base, per_mp = storing_line(self._fits[fit_of(task)].stats)
        return base + per_mp * float(feats[OUTPUT_MP])

    def phases(self, task: str, feats: np.ndarray) -> tuple[float, float, float]:
        """(head, steps, tail) forecast seconds of a job's features."""
        if len(feats) != NF:
            return 0.0, 0.0, 0.0
        parts = MASKS @ (self._fits[fit_of(task)].coef * feats)
        return float(parts[0]), float(parts[1]), float(parts[2])

    def observe(self, task: str, feats: np.ndarray, seconds: float, predicted: float | None = None,
                phases: tuple[float, float, float] | None = None, stored: float | None = None) -> None:  # fmt: skip
        """Learn from a finished job that took ``seconds`` of worker time (and ``stored``
        more until its results were stored)."""
        fit = self._fits[fit_of(task)]
        fit.stats = apply(fit.stats, *observation(feats, seconds, predicted, phases, stored), self.forget)
        fit.solve(self.ridge)
        self._restack()

    def load(self, stats: Mapping[str, Sequence[float]]) -> None:
        """Take the statistics a broker keeps (``Broker.cost_stats``) and refit."""
        for name, values in stats.items():
            fit = self._fits.get(name)
            if fit is not None and len(values) == STATS:
                fit.stats = np.asarray(values, dtype=np.float64)
                fit.solve(self.ridge)
        self._restack()

    def _restack(self) -> None:
        stacked = np.zeros(WIDTH)  # the last entry (the count) gets no weight
        for f, name in enumerate(FITS):
            stacked[f * NF : (f + 1) * NF] = self._fits[name].coef
        self._stacked = stacked  # one store: readers see the old vector or the new one

    def report(self, example: tuple[str, np.ndarray, str] | None = None) -> dict[str, dict[str, object]]:
        """What the model has learned, for /api/ps and /health: per fit, each term in
        seconds per unit, and (``example``: task, features, description) what a job
        would take, phase by phase."""
        out: dict[str, dict[str, object]] = {}
        for name, fit in self._fits.items():
            samples = fit.samples
            entry: dict[str, object] = {
                "tasks": [t for t in TASKS if fit_of(t) == name],
                "samples": samples,
                "mean_abs_pct_error": round(float(fit.stats[DECAYED + 1]) / samples, 4) if samples else None,
                "seconds": {t.name: _seconds(c) for t, c in zip(TERMS, fit.coef, strict=True)},
                "per": {t.name: t.per for t in TERMS},
                "prior_seconds": {t.name: _seconds(c) for t, c in zip(TERMS, fit.prior, strict=True)},
                "storing_seconds": dict(zip(("job", "output_mp"), map(_seconds, storing_line(fit.stats)), strict=True)),
            }
            if example is not None and fit_of(example[0]) == name:
                head, steps, tail = self.phases(example[0], example[1])
                store = self.storing(example[0], example[1])
                entry["example"] = {"job": example[2], "seconds": _seconds(head + steps + tail + store),
                                    "before_steps": _seconds(head), "steps": _seconds(steps), "after_steps": _seconds(tail),
                                    "storing": _seconds(store)}  # fmt: skip
            out[name] = entry
        return out


def _seconds(x: float) -> float:
    """Seconds to 4 significant digits (a report, not a coefficient dump)."""
    return float(f"{float(x):.4g}")
