"""The duration model: priors, online learning and running-job remainders."""

from __future__ import annotations

import random

import numpy as np

from server.forecast import CostModel, features, job_vector, running_remaining


def test_prior_is_used_until_data_arrives() -> None:
    model = CostModel({"generate": [0.0, 2.0, 0.0, 0.0]})
    vec = job_vector("generate", features(steps=10, megapixels=1.0, n=1, refs=0))
    assert model.predict(vec) == 20.0


def test_learns_cost_per_step_megapixel_and_reference_from_finished_jobs() -> None:
    truth = np.array([0.3, 0.8, 0.2, 0.1])
    model = CostModel({})  # generic prior, deliberately wrong
    rng = random.Random(0)
    for _ in range(60):
        f = features(rng.randint(2, 30), rng.choice([0.26, 0.5, 1.0, 2.0]), rng.randint(1, 4), rng.randint(0, 8))
        model.observe("edit", f, float(truth @ f))
    probe = features(20, 1.0, 2, 8)
    predicted = model.predict(job_vector("edit", probe))
    assert abs(predicted - truth @ probe) / (truth @ probe) < 0.02
    report = model.report()["edit"]
    assert report["samples"] == 60


def test_tasks_are_learned_separately() -> None:
    model = CostModel({})
    f = features(10, 1.0, 1, 0)
    for _ in range(30):
        model.observe("train", f, 100.0)
        model.observe("generate", f, 1.0)
    assert model.predict(job_vector("train", f)) > 50 * model.predict(job_vector("generate", f))


def test_running_remaining_uses_the_measured_step_rate() -> None:
    # started at t=0, 5 of 10 steps done at t=10: 2 s/step, 5 steps left, 1 s since the last step
    assert running_remaining(11.0, 0.0, predicted=100.0, step=5, total_steps=10, last_step_at=10.0) == 9.0
    # before the first step: prediction minus time spent
    assert running_remaining(3.0, 0.0, predicted=10.0, step=0, total_steps=10, last_step_at=None) == 7.0
    assert running_remaining(30.0, 0.0, predicted=10.0, step=0, total_steps=10, last_step_at=None) == 0.0


def test_a_far_off_prior_does_not_tilt_the_line_over_a_narrow_range_of_jobs() -> None:
    # a tiny model: ~50 ms a job + 0.8 s per step-megapixel, where the generic prior
    # says 0.5 s + 1 s; a dozen jobs over a narrow range of work, as after start-up
    truth = np.array([0.054, 0.83, 0.0, 0.0])
    model = CostModel({})
    rng = random.Random(1)
    for _ in range(12):
        f = features(rng.randint(2, 6), rng.choice([64, 80, 96]) ** 2 / 1e6, 1, 0)
        model.observe("generate", f, float(truth @ f))
    coef = model.report()["generate"]["coefficients"]
    assert abs(coef["steps_mp_n"] - 0.83) / 0.83 < 0.02, coef  # a ridge on each coefficient learned 0.06 here
    # so a job outside the range seen (n=2 at 128 px, 6 steps) is forecast well too
    big = features(6, 128 * 128 / 1e6, 2, 0)
    assert abs(model.predict(job_vector("generate", big)) - truth @ big) / (truth @ big) < 0.02


def test_after_one_job_the_prior_is_scaled_to_it() -> None:
    model = CostModel({"generate": [0.5, 1.0, 0.0, 0.0]})
    seen = features(5, 0.01, 1, 0)  # the prior says 0.55 s; it took 0.09 s
    model.observe("generate", seen, 0.09)
    assert abs(model.predict(job_vector("generate", seen)) - 0.09) < 1e-6
    # what one job cannot tell apart keeps the prior's proportions: 0.6/0.55 of it
    double = features(5, 0.02, 1, 0)
    assert abs(model.predict(job_vector("generate", double)) - 0.09 * 0.6 / 0.55) < 1e-6
