"""How a job and the forecast's statistics are written as numbers.

The forecast (``forecast.py``) models a pipeline call's seconds as linear in the
``TERMS``' features.  A queued job carries its features as one vector of ``WIDTH``
numbers: its fit's block of features, then a count of one, so the brokers can keep
prefix sums of the vectors in queue order and the sum ahead of a job gives both its
position and what it waits for.  A fit's learned statistics are another flat vector
(``STATS`` numbers) that a broker updates with ``apply`` (Redis in a script).

This module is the layout only: the brokers and the queue store and add these
vectors without knowing the cost model that reads them.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

TASKS: tuple[str, ...] = ("generate", "edit", "train", "upscale")
FITS: tuple[str, ...] = ("image", "train", "upscale")  # generate and edit share one fit


def fit_of(task: str) -> str:
    return "image" if task in ("generate", "edit") else task


@dataclass(frozen=True)
class Term:
    name: str
    phase: str  # head, steps, tail
    per: str  # what one unit of the feature is (reports)
    signed: bool = False  # may be below zero (a difference from another term); the others never are


TERMS: tuple[Term, ...] = (
    Term("job", "head", "pipeline call (text encoding, set-up)"),
    Term("reference", "head", "reference image"),
    Term("reference_mp", "head", "megapixel of reference images (VAE encoding)"),
    Term("after_job", "head", "job run right after another (whose results are stored meanwhile)"),
    Term("first_call", "head", "first job after the model loaded (one-time set-up: allocations, kernels, caches)"),
    Term("step", "steps", "denoising step"),
    Term("step_mp", "steps", "step per output megapixel of all images"),
    Term("step_image", "steps", "step per image of the batch, beyond its pixels (per-sample work)"),
    Term("step_reference", "steps", "step per reference image, per image (a model that resizes its references)"),
    Term("step_reference_mp", "steps", "step per reference megapixel, per image"),
    Term("edit_step", "steps", "step of an edit, beyond a generate's", signed=True),
    Term("edit_step_mp", "steps", "step per output megapixel of an edit, beyond a generate's", signed=True),
    Term("finish", "tail", "pipeline call after its last step"),
    Term("decode_mp", "tail", "output megapixel after the last step (VAE decoding)"),
    Term("decode_batch_mp", "tail", "output megapixel of each image after the first of a call, beyond decode_mp", signed=True),
)
FEATURES: tuple[str, ...] = tuple(t.name for t in TERMS)
SIGNED = np.array([t.signed for t in TERMS])
PHASES: tuple[str, ...] = ("head", "steps", "tail")
NF = len(FEATURES)
MASKS = np.array([[1.0 if t.phase == p else 0.0 for t in TERMS] for p in PHASES])  # phase x feature
DIM = NF * len(FITS)  # one block of features per fit
BUCKETS = 16  # batch classes (``JobRecord.batch`` keys, hashed) a queue vector tells apart
BATCH = DIM + 1  # then per bucket: (jobs, their steps, their megapixels per image) of a batchable job
WIDTH = BATCH + 3 * BUCKETS  # a job vector: its fit's features, a count of one (jobs ahead = sum of vectors), its bucket
STEP = FEATURES.index("step")
OUTPUT_MP = FEATURES.index("decode_mp")  # a job's output megapixels, all images
DECODE_BATCH_MP = FEATURES.index("decode_batch_mp")


def unknown_terms(prior: Mapping[str, float]) -> list[str]:
    """The names in a prior that are not terms of the model (sorted)."""
    return sorted(set(prior) - set(FEATURES))


def job_vector(task: str, feats: np.ndarray, batch: str = "") -> np.ndarray:
    """The job's features placed in its fit's block of a WIDTH vector, then a count
    of one job and, for a job of batch class ``batch`` (``JobRecord.batch``), its
    bucket's (1, steps, megapixels per image): the forecast gives these no weight
    (``batch_forecast`` reads them).  Features of another length (a record from an
    older version) count as nothing."""
    vec = np.zeros(WIDTH, dtype=np.float64)
    if len(feats) == NF:
        f = FITS.index(fit_of(task))
        vec[f * NF : (f + 1) * NF] = feats
        if batch and fit_of(task) == "image":
            b = BATCH + 3 * bucket(batch)
            vec[b : b + 3] = (1.0, feats[STEP], feats[OUTPUT_MP] - feats[DECODE_BATCH_MP])
    vec[DIM] = 1.0
    return vec


def bucket(batch: str) -> int:
    """The bucket of a batch class in a queue vector (the same in every process)."""
    return zlib.crc32(batch.encode()) % BUCKETS


# a fit's statistics as one flat vector, so that a broker can keep them (and add a
# job's contribution atomically, as Redis does in a script): the forgetting-weighted
# sums first, then the plain counters
Y_SUM = NF * NF + 2 * NF  # A = sum f f^T, b = sum f y, s = sum f; then sum y, weight (jobs)
WEIGHT = Y_SUM + 1
STORING = WEIGHT + 1  # jobs timed, sum x, sum x^2, sum t, sum x t: x output megapixels, t seconds to store
DECAYED = STORING + 5
ADDED = 2  # samples, sum of |predicted - seconds| / seconds
STATS = DECAYED + ADDED


def apply(stats: np.ndarray, decayed: list[float], added: list[float], forget: float) -> np.ndarray:
    """``stats`` after one observation (what the brokers' ``observe_cost`` computes)."""
    out = stats.copy()
    out[:DECAYED] = forget * out[:DECAYED] + np.asarray(decayed)
    out[DECAYED:] += np.asarray(added)
    return out
