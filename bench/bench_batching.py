"""Batching across requests (run by hand: ``python bench/bench_batching.py [--rounds 3] [--jobs 16]``).

One server (memory broker, ``tests/tiny_server.py``: one torch thread) serves the
same tiny random-weight SDXL twice, each model in its own process: ``batch4``
(``target_inflight: 4``) and ``batch1`` (``target_inflight: 1``).  Each round drains,
on both models (the order flips each round):

* **compatible**: N jobs of 64x64, 4 steps, the same guidance, prompts and seeds
  differing: they may share pipeline calls;
* **mixed**: N jobs no two of which can share a call (4 step counts x 4 sizes):
  batching must cost nothing here (the claim's look at the queue included);
* **interleaved**: steps cycle through 3, 4, 5, 6, so a batch would overtake jobs:
  formed only where the forecast says no overtaken job finishes more than
  ``batch_max_delay`` later (no goal: it shows what the forecast allows).

A drain is submitted at once; its time is the last job's ``finished_at`` minus the
first job's ``started_at`` (the broker's clock).  Printed: per round the ratio
batch4 / batch1, and the medians (goals: compatible <= 0.7, mixed <= 1.03).  The
server's log lines ``one call of K`` say which batches formed.

Each job's forecast error, as ``bench/bench_forecast.py`` measures it
(``expected_time_seconds`` at submission vs ``finished_at - created_at``), is printed
per kind: MAPE and mean signed error of the jobs that ran batched (batch4, in calls
of two or more: the log says which), of those batch4 ran alone, and of batch1's
(goal: batched within the same bounds as single).  And what the server adds per job
(the drain less its pipeline calls): in a mixed queue, the two models' processes may
run the same calls at different speeds (this VM: up to +-20% between processes), so
the drains' ratio there is read with the calls' ratio beside it.

``--pin``: both models' processes on core 0 (they run in turn, as on one GPU), the
server and the bench on the other cores.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.nodes import pin  # noqa: E402
from tests import tiny_pipelines as tp  # noqa: E402
from tests.servers import RunningServer, start_server  # noqa: E402


def settings(folder: Path) -> dict[str, Any]:
    common = {"backend": "sdxl", "enabled": True, "model_path": str(folder), "default_width": 64, "default_height": 64}
    return {"models": {"batch4": {**common, "target_inflight": 4}, "batch1": {**common, "target_inflight": 1}}, "default_model": "batch1"}


KINDS = {"compatible": 0.7, "mixed": 1.03, "interleaved": None}  # kind -> goal of batch4 / batch1


def bodies(kind: str, jobs: int) -> list[dict[str, Any]]:
    if kind == "compatible":
        shapes = [(4, 64)] * jobs
    elif kind == "mixed":  # no two alike (16 jobs: every pair of 4 step counts and 4 sizes)
        shapes = [(3 + k % 4, 64 + 16 * (k // 4 % 4)) for k in range(jobs)]
    else:  # interleaved: steps cycle 3-6, so job k and k + 4 could share a call, overtaking three
        shapes = [(3 + k % 4, 64) for k in range(jobs)]
    return [{"prompt": f"a lighthouse on a cliff, number {k}", "seed": 100 + k, "steps": s, "width": w, "height": w}
            for k, (s, w) in enumerate(shapes)]  # fmt: skip


def drain(c: httpx.Client, model: str, kind: str, jobs: int, errors: dict[str, float] | None = None,
          calls: list[float] | None = None) -> float:  # fmt: skip
    """Seconds to drain ``jobs`` of ``kind`` on ``model``; each job's forecast error
    (signed, relative: + is too long) goes into ``errors`` by job id, and the seconds
    of the drain's pipeline calls (its images' ``seconds``: a call's split by images)
    onto ``calls``."""
    ids = [c.post("/api/generate", json={**b, "model": model}).json()["task_id"] for b in bodies(kind, jobs)]
    done = []
    for tid in ids:
        while (st := c.get("/api/status", params={"task_id": tid, "wait": 30}).json())["status"] in ("waiting", "running"):
            pass
        assert st["status"] == "done", st
        done.append(st)
        if errors is not None:
            actual = st["finished_at"] - st["created_at"]
            errors[tid] = (st["expected_time_seconds"] - actual) / actual
    if calls is not None:
        calls.append(sum(float(im["seconds"]) for d in done for im in d["images"]))
    return float(max(d["finished_at"] for d in done) - min(d["started_at"] for d in done))


def call_sizes(log: str, model: str) -> dict[str, int]:
    """Job id -> jobs of the call it ran in, from the server's log (a job not named ran alone)."""
    return {tid: int(n) for ids, n in re.findall(rf"jobs ([\w,]+) on {model}: one call of (\d+)", log) for tid in ids.split(",")}


def error_line(name: str, errs: list[float]) -> str:
    if not errs:
        return f"{name}: no jobs"
    mape = 100 * statistics.fmean(abs(e) for e in errs)
    return f"{name}: MAPE {mape:.1f}%, mean signed {100 * statistics.fmean(errs):+.1f}% ({len(errs)} jobs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--pin", action="store_true",
                        help="both models' processes on core 0 (they run in turn: the GPU), the server and the bench on the others")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.pin and len(cores) < 2:
        parser.error("--pin needs two cores or more")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        folder = tp.build_sdxl(tmp / "sdxl")
        srv: RunningServer = start_server(tmp, settings(folder), env={"OMP_NUM_THREADS": "1"}, script=ROOT / "tests" / "tiny_server.py")
        try:
            c = srv.client
            for model in ("batch4", "batch1"):  # warm-up: the first calls, and a forecast to decide with
                for kind in KINDS:
                    drain(c, model, kind, 4)
            if args.pin:  # after the warm-up: both models' processes are up
                children = psutil.Process(srv.proc.pid).children(recursive=True)
                pin(srv.proc.pid, set(cores[1:]))
                pin(os.getpid(), set(cores[1:]))
                for child in children:
                    pin(child.pid, {cores[0]})
            errors: dict[str, dict[str, float]] = {f"{kind}/{model}": {} for kind in KINDS for model in ("batch4", "batch1")}
            ratios: dict[str, list[float]] = {kind: [] for kind in KINDS}
            times: dict[str, list[float]] = {f"{kind}/{model}": [] for kind in KINDS for model in ("batch4", "batch1")}
            calls: dict[str, list[float]] = {key: [] for key in times}
            for r in range(args.rounds):
                for kind in KINDS:
                    order = ("batch4", "batch1") if r % 2 == 0 else ("batch1", "batch4")
                    got = {model: drain(c, model, kind, args.jobs, errors[f"{kind}/{model}"], calls[f"{kind}/{model}"]) for model in order}
                    times[f"{kind}/batch4"].append(got["batch4"])
                    times[f"{kind}/batch1"].append(got["batch1"])
                    ratios[kind].append(got["batch4"] / got["batch1"])
                    print(f"round {r + 1} {kind}: batch4 {got['batch4']:.3f} s, batch1 {got['batch1']:.3f} s, ratio {ratios[kind][-1]:.3f}", flush=True)
            formed = [int(k) for k in re.findall(r"on batch4: one call of (\d+)", srv.log())]
            sizes = call_sizes(srv.log(), "batch4")
        finally:
            srv.stop()
    for kind, goal in KINDS.items():
        m4, m1 = statistics.median(times[f"{kind}/batch4"]), statistics.median(times[f"{kind}/batch1"])
        rs = ratios[kind]
        print(f"{kind}: medians {m4:.3f} / {m1:.3f} s = {m4 / m1:.3f} (rounds {', '.join(f'{x:.3f}' for x in rs)}; "
              f"spread {min(rs):.3f}-{max(rs):.3f}); goal: {'<= ' + str(goal) if goal else 'none'}")  # fmt: skip
    print(f"batches formed on batch4: {len(formed)} (sizes {sorted(formed)})")
    print("what the server adds (drain - its pipeline calls, per job; median of the rounds) and the calls themselves:")
    for kind in KINDS:
        gap = {m: statistics.median((t - cs) / args.jobs for t, cs in zip(times[f"{kind}/{m}"], calls[f"{kind}/{m}"], strict=True))
               for m in ("batch4", "batch1")}  # fmt: skip
        c4, c1 = statistics.median(calls[f"{kind}/batch4"]), statistics.median(calls[f"{kind}/batch1"])
        print(f"  {kind}: per job batch4 {1000 * gap['batch4']:.2f} ms, batch1 {1000 * gap['batch1']:.2f} ms; "
              f"pipeline calls batch4 / batch1 {c4:.3f} / {c1:.3f} s = {c4 / c1:.3f}")  # fmt: skip
    print("forecast error (expected_time_seconds at submission vs finished_at - created_at; + is too long):")
    for kind in KINDS:
        on4 = errors[f"{kind}/batch4"]
        batched = [e for tid, e in on4.items() if sizes.get(tid, 1) > 1]
        alone = [e for tid, e in on4.items() if sizes.get(tid, 1) == 1]
        print(f"  {kind}: {error_line('batched (batch4, calls of 2+)', batched)}; {error_line('alone on batch4', alone)}; "
              f"{error_line('single (batch1)', list(errors[f'{kind}/batch1'].values()))}")  # fmt: skip
    print("goal: batched jobs within the same bounds as single ones (bench/bench_forecast.py: MAPE <= 5%, signed within +-3%)")


if __name__ == "__main__":
    main()
