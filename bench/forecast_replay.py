"""Replay traces of ``bench_forecast.py --trace`` through the forecast model (run by hand).

    python bench/forecast_replay.py TRACE.jsonl [--drop decode_batch_mp,...]

A live run of ``bench_forecast.py`` measures the model and this host's noise together:
the same code and seeds move a family's error by several points from run to run. A
replay holds the jobs fixed. For each traced run it learns the warm-up jobs' measured
phases in a fresh ``CostModel`` (the generic prior, as a diffusers backend has), then
forecasts each burst job at submission the way ``server/standing.py`` does — the
first job's own cost (it runs at once, after no other job), then the jobs ahead with
``after_job``, less the time the first had run when the job was submitted, then the
job's own storing — and compares with the job's measured time (``finished_at -
created_at``). Not replayed: the event loop's CPU time that the server adds to the
running job (``Runner.delayed``; not in the trace), so the replay of a burst reads a
little shorter than the live forecasts did. It prints, per
family, the live error (what the server said), the replay of the model as it is (a
check that the replay reproduces the live figures), and, with ``--drop``, the replay
with those terms left out (their features held at zero while learning and
forecasting): what each term is worth on the same jobs.

The stub's traces replay against the generic prior, not the stub backend's own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from server.features import FEATURES, job_vector  # noqa: E402
from server.forecast import CostModel, call_features, with_after_job  # noqa: E402


def features(job: dict[str, Any], after: bool, dropped: np.ndarray, first: bool = False) -> np.ndarray:
    f = call_features(job["task"], job["steps"], job["width"] * job["height"] / 1e6, job["n"], job["reference_mps"])
    return with_after_job(f, after, first) * dropped


def replay(run: dict[str, Any], dropped: np.ndarray) -> list[float]:
    """Signed errors of the run's burst jobs, forecast from its warm-up jobs."""
    model = CostModel({})
    warm = [j for j in run["jobs"] if not j["burst"]]
    burst = [j for j in run["jobs"] if j["burst"]]
    for k, j in enumerate(warm):  # the first ran right after the load (older traces do not say)
        feats = features(j, j["after_job"], dropped, j.get("first_call", k == 0))
        model.observe(j["task"], feats, j["worker_seconds"], phases=tuple(j["phases"]), stored=j.get("stored"))  # type: ignore[arg-type]

    def cost(j: dict[str, Any], after: bool) -> float:
        return model.predict(job_vector(j["task"], features(j, after, dropped)))

    def storing(j: dict[str, Any]) -> float:
        return model.storing(j["task"], features(j, True, dropped))

    first = burst[0]
    errors = []
    ahead = 0.0  # the queued jobs' forecasts so far
    for k, j in enumerate(burst):
        if k == 0:
            forecast = cost(j, after=False) + storing(j)
        else:  # the first job's time left on the model, the jobs between, this job's own storing
            running = max(0.0, cost(first, after=False) - (j["created_at"] - first["started_at"]))
            ahead += cost(j, after=True)
            forecast = running + ahead + storing(j)
        actual = j["finished_at"] - j["created_at"]
        errors.append((forecast - actual) / actual)
    return errors


def live(run: dict[str, Any]) -> list[float]:
    return [(j["expected"] - (j["finished_at"] - j["created_at"])) / (j["finished_at"] - j["created_at"]) for j in run["jobs"] if j["burst"]]


def summary(errors: list[float]) -> str:
    return f"{100 * statistics.mean(abs(e) for e in errors):5.1f}% / {100 * statistics.mean(errors):+5.1f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+", type=Path, help="JSON-lines files of bench_forecast.py --trace")
    p.add_argument("--drop", default="", help=f"comma-separated terms to leave out, of {', '.join(FEATURES)}")
    p.add_argument("--runs", action="store_true", help="print every run, not only each family's total")
    args = p.parse_args()
    drop = [t for t in args.drop.split(",") if t]
    if unknown := sorted(set(drop) - set(FEATURES)):
        p.error(f"unknown terms {unknown}; the terms are {', '.join(FEATURES)}")
    keep = np.ones(len(FEATURES))
    none = keep.copy()
    for t in drop:
        keep[FEATURES.index(t)] = 0.0
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in args.traces:
        for line in path.read_text().splitlines():
            run = json.loads(line)
            errs = {"live": live(run), "replay": replay(run, none)}
            if drop:
                errs["dropped"] = replay(run, keep)
            for k, v in errs.items():
                rows[run["family"]][k].extend(v)
            if args.runs:
                print(f"{run['family']:12s} seed {run['seed']} attempt {run['attempt']} (drift {100 * run['drift']:.1f}%): "
                      + "  ".join(f"{k} {summary(v)}" for k, v in errs.items()))  # fmt: skip
    cols = ["live", "replay"] + (["dropped"] if drop else [])
    head = "  ".join(f"{c if c != 'dropped' else 'without ' + ','.join(drop):>20s}" for c in cols)
    print(f"\n{'family':12s} {'jobs':>5s}  {head}   (MAPE / mean signed)")
    for family, errs in rows.items():
        print(f"{family:12s} {len(errs['live']):5d}  " + "  ".join(f"{summary(errs[c]):>20s}" for c in cols))


if __name__ == "__main__":
    main()
