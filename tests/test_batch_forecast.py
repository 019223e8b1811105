"""The forecast of queued jobs with the batching they will get (server/batch_forecast.py):
the calls counted from the queue's sums are the calls the worker's planner forms."""

from __future__ import annotations

import random

import numpy as np
import pytest

from server.batch_forecast import behind, queue_seconds, saved, waiting_seconds
from server.batch_plan import batch_features
from server.features import BUCKETS, bucket, job_vector
from server.forecast import CostModel, prior_vector
from server.items import Item
from server.jobs import JobRecord, batch_key
from server.standing import job_features

# a model whose calls share much (a GPU: the per-step cost hardly grows with the batch)
# and decode a batch cheaper per image: every term of a call's part is in play
COSTS = prior_vector({"job": 0.05, "after_job": 0.01, "step": 0.04, "step_mp": 0.5, "step_image": 0.003, "finish": 0.02,
                      "decode_mp": 0.6, "decode_batch_mp": -0.2})  # fmt: skip


def model() -> CostModel:
    return CostModel({"image": COSTS})


def job(task_id: str, steps: int = 4, side: int = 64, n: int = 1) -> JobRecord:
    rec = JobRecord(model="m", task="generate", id=task_id, items=[Item(prompt=task_id, width=side, height=side, steps=steps, n=n, seed=1)])
    rec.batch = batch_key(rec, True)
    rec.features = job_features(rec, {})
    return rec


def vec(j: JobRecord) -> np.ndarray:
    return job_vector(j.task, np.asarray(j.features), j.batch)


def planned(cost: CostModel, calls: list[list[JobRecord]]) -> float:
    """What the worker's planner forecasts for these calls, one after the other."""
    return sum(cost.predict(job_vector("generate", batch_features(c))) for c in calls)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_a_classs_jobs_are_counted_as_the_calls_the_planner_forms(size: int) -> None:
    cost = model()
    jobs = [job(f"j{k}", n=1 + k % 2) for k in range(9)]
    total = sum((vec(j) for j in jobs), np.zeros_like(vec(jobs[0])))
    calls = [jobs[k : k + size] for k in range(0, len(jobs), size)]
    assert queue_seconds(cost, total, size) == pytest.approx(planned(cost, calls), rel=1e-9)
    one_by_one = sum(cost.predict(vec(j)) for j in jobs)
    assert (saved(cost, total, size) > 0) == (size > 1)
    assert queue_seconds(cost, total, 1) == pytest.approx(one_by_one, rel=1e-9)


def test_classes_are_counted_apart() -> None:
    cost = model()
    a = [job(f"a{k}", steps=4) for k in range(5)]
    b = [job(f"b{k}", steps=8, side=128) for k in range(3)]
    assert bucket(a[0].batch) != bucket(b[0].batch)  # (hashed: these two do not collide)
    mixed = [a[0], b[0], a[1], b[1], a[2], a[3], b[2], a[4]]
    total = sum((vec(j) for j in mixed), np.zeros_like(vec(a[0])))
    assert queue_seconds(cost, total, 4) == pytest.approx(planned(cost, [a[:4], a[4:], b]), rel=1e-9)


def test_a_job_that_never_batches_counts_as_its_own_call() -> None:
    cost = model()
    lone = job("x")
    lone.batch = ""  # an edit, a job of several items, a family that does not batch...
    v = vec(lone)
    assert saved(cost, v * 5, 4) == 0.0
    assert waiting_seconds(cost, v * 3, v, 4, companions=3) == pytest.approx((3 * cost.predict(v), cost.predict(v)))


def test_a_waiting_job_finishes_with_its_call() -> None:
    """Jobs of one class, size 4: job k of the queue finishes with call k // 4, which
    holds the jobs k // 4 * 4 .. +3 (fewer at the tail): its forecast is the calls
    before and its own, wherever it is in the call."""
    cost = model()
    for sizes in ([1] * 10, [1 + k % 3 for k in range(10)]):  # images per job: all alike, and not
        jobs = [job(f"j{k}", n=n) for k, n in enumerate(sizes)]
        vectors = [vec(j) for j in jobs]
        total = sum(vectors, np.zeros_like(vectors[0]))
        calls = [jobs[k : k + 4] for k in range(0, len(jobs), 4)]
        for k in range(len(jobs)):
            ahead = sum(vectors[:k], np.zeros_like(vectors[0]))
            companions = behind(total, ahead, vectors[k], queued=True)
            assert companions == len(jobs) - k - 1
            before, own = waiting_seconds(cost, ahead, vectors[k], 4, companions)
            mine = k // 4
            if len(set(sizes)) == 1:  # the calls before, and its own
                assert (before, own) == pytest.approx((planned(cost, calls[:mine]), planned(cost, [calls[mine]])), rel=1e-9), k
            elif k == min(len(jobs), 4 * mine + 4) - 1:  # the last of its call: what runs until it is done
                assert before + own == pytest.approx(planned(cost, calls[: mine + 1]), rel=1e-9), k
            else:  # the others of its call counted with its own images (they differ: not exact), within the extremes
                call = calls[mine]
                low, high = ([job(f"s{i}", n=f(sizes)) for i in range(len(call))] for f in (min, max))
                assert planned(cost, [*calls[:mine], low]) - 1e-9 <= before + own <= planned(cost, [*calls[:mine], high]) + 1e-9, k


def test_a_new_job_counts_its_class_behind_it_too() -> None:
    cost = model()
    queued = [job(f"j{k}") for k in range(2)]
    late = job("late")
    late.priority = -1  # ahead of both
    vectors = [vec(j) for j in queued]
    total = sum(vectors, np.zeros_like(vectors[0]))
    ahead = np.zeros_like(total)
    assert behind(total, ahead, vec(late), queued=False) == 2
    assert waiting_seconds(cost, ahead, vec(late), 4, 2)[1] == pytest.approx(planned(cost, [[late, *queued]]), rel=1e-9)


def test_a_class_whose_calls_share_nothing_is_counted_one_by_one() -> None:
    cost = CostModel({"image": {"step_mp": 1.0}})  # nothing per call: batching saves nothing
    jobs = [job(f"j{k}") for k in range(6)]
    total = sum((vec(j) for j in jobs), np.zeros_like(vec(jobs[0])))
    assert saved(cost, total, 4) == 0.0
    before, own = waiting_seconds(cost, total - vec(jobs[-1]), vec(jobs[-1]), 4, 0)
    assert own == pytest.approx(cost.predict(vec(jobs[-1])))


def test_collisions_are_rare_for_a_few_classes() -> None:
    rng = random.Random(1)
    keys = {batch_key(job(f"k{i}", steps=rng.randint(1, 50), side=rng.choice([512, 768, 1024])), True) for i in range(200)}
    spread = {bucket(k) for k in keys}
    assert len(spread) == BUCKETS  # every bucket used: the hash spreads the classes
