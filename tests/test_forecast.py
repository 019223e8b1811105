"""The duration model: priors, online learning by phase, and running-job remainders."""

from __future__ import annotations

import random

import numpy as np
import pytest

from server.features import FEATURES, MASKS, job_vector
from server.forecast import OUTPUT_MP, CostModel, call_features, prior_vector, with_after_job
from server.timing import CallTimes, measured_phases, running_remaining

# a tiny pipeline as measured: 40 ms per call before the steps, 12 ms per step plus
# 0.8 s per step-megapixel, 10 ms + 0.5 s per megapixel after the steps
TRUTH = prior_vector({"job": 0.04, "step": 0.012, "step_mp": 0.8, "finish": 0.01, "decode_mp": 0.5})


def truth_phases(feats: np.ndarray, truth: np.ndarray = TRUTH) -> tuple[float, float, float]:
    head, steps, tail = MASKS @ (truth * feats)
    return float(head), float(steps), float(tail)


def tiny_job(rng: random.Random, refs: int = 0) -> np.ndarray:
    side = rng.choice([64, 80, 96, 112, 128]) ** 2 / 1e6
    return call_features("edit" if refs else "generate", rng.randint(2, 6), side, rng.randint(1, 2), [0.01] * refs)


def predict(model: CostModel, task: str, feats: np.ndarray) -> float:
    return model.predict(job_vector(task, feats))


def test_prior_is_used_until_data_arrives() -> None:
    model = CostModel({"image": {"step_mp": 2.0}})
    assert predict(model, "generate", call_features("generate", steps=10, megapixels=1.0, n=1)) == 20.0


def test_a_prior_names_its_terms() -> None:
    with pytest.raises(ValueError, match="unknown forecast terms"):
        prior_vector({"steps_mp_n": 1.0})
    assert prior_vector({}).tolist() == [0.0] * len(FEATURES)


def test_phases_measured_from_the_step_times() -> None:
    # a call at t=0: steps at 0.5, 0.6, 0.7, 0.8 (median gap 0.1), returned at 1.0; worker time 1.1
    call = CallTimes(0.0, [0.5, 0.6, 0.7, 0.8], 1.0)
    head, steps, tail = measured_phases([call], 1.1)
    assert (round(head, 6), round(steps, 6), round(tail, 6)) == (0.5, 0.4, 0.2)
    # a gap spanning a preview does not count as a step (the median ignores it)
    slow = CallTimes(0.0, [0.5, 0.6, 0.9, 1.0], 1.2)
    assert round(measured_phases([slow], 1.2)[1], 6) == 0.4  # type: ignore[index]
    assert measured_phases([CallTimes(0.0, [0.5], 1.0)], 1.0) is None  # one step: not timeable
    assert measured_phases([], 3.0) is None  # a training run


def test_learns_each_phase_from_a_dozen_jobs_and_forecasts_bigger_ones() -> None:
    model = CostModel({})  # the generic prior, far off
    rng = random.Random(0)
    for _ in range(12):
        f = tiny_job(rng)
        model.observe("generate", f, sum(truth_phases(f)), phases=truth_phases(f))
    for probe in (call_features("generate", 6, 128 * 128 / 1e6, 2), call_features("generate", 30, 0.25, 4)):
        true = float(TRUTH @ probe)
        assert abs(predict(model, "generate", probe) - true) / true < 0.01, model.report()
    head, steps, tail = model.phases("generate", call_features("generate", 30, 0.25, 4))
    assert abs(tail - (0.01 + 0.5)) < 0.01 and abs(head - 0.04) < 0.005


def test_totals_alone_confound_the_phases_that_timings_separate() -> None:
    # over a narrow range of jobs, the per-call constant, the per-step cost and the
    # decode cost are near collinear: from totals alone (with 3% noise, as measured
    # times have) a job far out of the range is forecast far off; with the phases
    # measured it is forecast right
    truth = prior_vector({"job": 0.2, "step": 0.002, "step_mp": 0.5, "finish": 0.01, "decode_mp": 4.0})
    totals, phased = CostModel({}), CostModel({})
    rng = random.Random(3)
    for _ in range(12):
        f = call_features("generate", rng.randint(4, 5), rng.choice([64, 72]) ** 2 / 1e6, 1)
        noisy = tuple(p * (1 + rng.uniform(-0.03, 0.03)) for p in truth_phases(f, truth))
        totals.observe("generate", f, sum(noisy))
        phased.observe("generate", f, sum(noisy), phases=noisy)  # type: ignore[arg-type]
    far = call_features("generate", 2, 0.25, 2)
    true = float(truth @ far)
    assert abs(predict(phased, "generate", far) - true) / true < 0.05
    assert abs(predict(totals, "generate", far) - true) / true > 0.2


def test_a_batch_that_decodes_cheaper_per_image_is_learned() -> None:
    # as measured on the tiny Qwen edit pipeline: two images decode in far less than
    # twice the time of one; with decoding linear in images (no decode_batch_mp), the
    # tail of a one-image job far larger than any seen would be forecast short
    truth = TRUTH + prior_vector({"decode_mp": 3.0, "decode_batch_mp": -2.0})
    model = CostModel({})
    rng = random.Random(2)
    for _ in range(12):
        f = tiny_job(rng)
        model.observe("generate", f, float(truth @ f), phases=truth_phases(f, truth))
    assert -2.2 < model.term("generate", "decode_batch_mp") < -1.8, model.report()
    for probe in (call_features("generate", 4, 0.25, 1), call_features("generate", 4, 0.25, 2)):
        true = float(truth @ probe)
        assert abs(predict(model, "generate", probe) - true) / true < 0.02, (probe, model.report())


def test_storing_counts_for_the_job_itself_not_for_the_jobs_behind_it() -> None:
    from server.jobs import JobRecord
    from server.standing import predict as job_forecast

    model = CostModel({})
    rng = random.Random(4)
    for _ in range(12):
        f = tiny_job(rng)
        stored = 0.002 + 0.5 * f[OUTPUT_MP]  # encoding grows with the output's pixels
        model.observe("generate", f, float(TRUTH @ f), phases=truth_phases(f), stored=stored)
    big = call_features("generate", 4, 0.25, 2)
    assert model.storing("generate", big) == pytest.approx(0.002 + 0.5 * 0.5, rel=1e-6)
    # what a job costs the jobs queued behind it: worker time only (its storing overlaps the next job)
    assert predict(model, "generate", big) == pytest.approx(float(TRUTH @ big), rel=0.01)
    # what the job itself waits for: its results stored too, in the phase after the steps
    seconds, phases = job_forecast(model, JobRecord(model="m", task="generate", features=big.tolist()))
    assert seconds == pytest.approx(predict(model, "generate", big) + 0.252, rel=1e-6)
    assert phases[2] == pytest.approx(model.phases("generate", big)[2] + 0.252, rel=1e-6)


def test_the_first_job_after_a_load_teaches_first_call_not_the_other_terms() -> None:
    # the first call of a freshly loaded pipeline sets up (allocations, kernels, caches):
    # 0.3 s more, spread over its phases; learned as an ordinary job, it would raise
    # the head and tail of every forecast after it
    rng = random.Random(5)
    jobs = [tiny_job(rng) for _ in range(12)]
    flagged, unflagged = CostModel({}), CostModel({})
    for k, f in enumerate(jobs):
        head, steps, tail = truth_phases(f)
        if k == 0:
            head, steps, tail = head + 0.15, steps + 0.05, tail + 0.1
        flagged.observe("generate", with_after_job(f, False, first_call=k == 0), head + steps + tail, phases=(head, steps, tail))
        unflagged.observe("generate", f, head + steps + tail, phases=(head, steps, tail))
    probe = call_features("generate", 4, 96 * 96 / 1e6, 1)
    true = float(TRUTH @ probe)
    assert abs(predict(flagged, "generate", probe) - true) / true < 0.02, flagged.report()
    assert abs(predict(unflagged, "generate", probe) - true) / true > 0.05  # what the term is for
    assert flagged.term("generate", "first_call") == pytest.approx(0.3, rel=0.1)
    # a job that is the first after a load is forecast with it
    first = with_after_job(probe, False, first_call=True)
    assert predict(flagged, "generate", first) == pytest.approx(true + 0.3, rel=0.05)


def test_a_step_costs_per_image_beyond_its_pixels() -> None:
    # as measured on tiny SDXL: a step of two 64x64 images costs far more than one of
    # a 96x96 image with about as many pixels; in pixels alone, one of the two is off
    truth = TRUTH + prior_vector({"step_image": 0.006})
    model = CostModel({})
    rng = random.Random(6)
    for _ in range(12):
        f = tiny_job(rng)
        model.observe("generate", f, float(truth @ f), phases=truth_phases(f, truth))
    assert model.term("generate", "step_image") == pytest.approx(0.006, rel=0.1), model.report()
    for probe in (call_features("generate", 6, 64 * 64 / 1e6, 2), call_features("generate", 6, 96 * 96 / 1e6, 1)):
        true = float(truth @ probe)
        assert abs(predict(model, "generate", probe) - true) / true < 0.02, (probe, model.report())


def test_references_are_learned_in_their_pixels() -> None:
    truth = TRUTH + prior_vector({"reference_mp": 2.0, "step_reference_mp": 0.6})
    model = CostModel({})
    rng = random.Random(1)
    for _ in range(20):
        refs = rng.randint(0, 3)
        f = call_features("edit" if refs else "generate", rng.randint(2, 6), 0.01, rng.randint(1, 2),
                          [rng.choice([64, 128]) ** 2 / 1e6 for _ in range(refs)])  # fmt: skip
        model.observe("edit" if refs else "generate", f, float(truth @ f), phases=truth_phases(f, truth))
    big = call_features("edit", 4, 0.01, 1, [0.25, 0.25])  # two references far larger than any seen
    assert abs(predict(model, "edit", big) - truth @ big) / (truth @ big) < 0.03


def test_generate_and_edit_share_a_fit_train_has_its_own() -> None:
    model = CostModel({})
    f = call_features("generate", 10, 1.0, 1)
    for _ in range(30):
        model.observe("train", f, 100.0)
        model.observe("generate", f, 1.0)
    assert predict(model, "train", f) > 50 * predict(model, "generate", f)
    assert model.report()["image"]["samples"] == 30 and model.report()["image"]["tasks"] == ["generate", "edit"]


def test_after_one_job_the_prior_is_scaled_to_it() -> None:
    model = CostModel({"image": {"job": 0.5, "step_mp": 1.0}})
    seen = call_features("generate", 5, 0.01, 1)  # the prior says 0.55 s; it took 0.09 s
    model.observe("generate", seen, 0.09)
    assert abs(predict(model, "generate", seen) - 0.09) < 1e-6
    # what one job cannot tell apart keeps the prior's proportions: 0.6/0.55 of it
    double = call_features("generate", 5, 0.02, 1)
    assert abs(predict(model, "generate", double) - 0.09 * 0.6 / 0.55) < 1e-6


def test_report_is_in_seconds_with_an_example_job() -> None:
    model = CostModel({})
    rng = random.Random(2)
    for _ in range(12):
        f = tiny_job(rng)
        model.observe("generate", f, sum(truth_phases(f)), phases=truth_phases(f))
    example = call_features("generate", 4, 128 * 128 / 1e6, 1)
    report = model.report(("generate", example, "128x128, 4 steps, 1 image"))["image"]
    assert abs(report["seconds"]["step"] - 0.012) < 0.002, report  # type: ignore[index]
    ex = report["example"]
    assert abs(ex["seconds"] - TRUTH @ example) < 0.01 * (TRUTH @ example)  # type: ignore[index]
    assert abs(ex["before_steps"] + ex["steps"] + ex["after_steps"] - ex["seconds"]) < 1e-3  # type: ignore[index]


def test_running_remaining_is_the_step_rate_plus_the_learned_tail() -> None:
    # first step at t=2, 5 of 10 at t=10: 2 s/step, 5 steps left, 1 s since the last, tail 3 s
    left = running_remaining(11.0, 0.0, 100.0, 5, 10, last_step_at=10.0, first_step_at=2.0, phases=(1.0, 20.0, 3.0))
    assert left == 2.0 * 5 + 3.0 - 1.0
    # after the last step: the tail still to come
    assert running_remaining(10.5, 0.0, 100.0, 10, 10, 10.0, 1.0, (1.0, 9.0, 3.0)) == 2.5
    # after one step: the forecast's rate (20 s over 10 steps)
    assert running_remaining(3.0, 0.0, 100.0, 1, 10, 3.0, 3.0, (1.0, 20.0, 3.0)) == 2.0 * 9 + 3.0
    # before the first step: prediction minus time spent
    assert running_remaining(3.0, 0.0, predicted=10.0, step=0, total_steps=10, last_step_at=None) == 7.0
    assert running_remaining(30.0, 0.0, predicted=10.0, step=0, total_steps=10, last_step_at=None) == 0.0


def test_features_of_an_older_format_count_as_nothing() -> None:
    model = CostModel({})
    assert predict(model, "generate", np.array([1.0, 0.1, 0.0, 0.0])) == 0.0


def test_costs_never_go_negative_but_an_edit_may_cost_less_per_step() -> None:
    # img2img edits run strength x steps: per step an edit costs 0.35 of a generate
    truth = TRUTH + prior_vector({"reference_mp": 0.5})
    model = CostModel({})
    rng = random.Random(4)
    for _ in range(24):
        edit = rng.random() < 0.5
        f = tiny_job(rng, refs=1 if edit else 0)
        head, steps, tail = truth_phases(f, truth)
        if edit:
            steps *= 0.35
        noisy = tuple(p * (1 + rng.uniform(-0.03, 0.03)) for p in (head, steps, tail))
        model.observe("edit" if edit else "generate", f, sum(noisy), phases=noisy)  # type: ignore[arg-type]
    seconds = model.report()["image"]["seconds"]
    assert all(v >= 0 for k, v in seconds.items() if not k.startswith("edit_")), seconds  # type: ignore[union-attr]
    assert seconds["edit_step_mp"] < 0 or seconds["edit_step"] < 0, seconds  # type: ignore[index]
    probe = call_features("edit", 6, 128 * 128 / 1e6, 2, [0.01])
    head, steps, tail = truth_phases(probe, truth)
    true = head + 0.35 * steps + tail
    assert abs(predict(model, "edit", probe) - true) / true < 0.05
