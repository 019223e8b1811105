"""Core server benchmarks (run by hand: ``python bench/bench_core.py``).

1. Server CPU per stub job (submit, wait, fetch) through the API, against a bare
   Starlette app answering the same three requests, measured in one run.  The
   server's own CPU seconds are counted (psutil), not the client's jobs/s.
2. Status latency, with 5,000 jobs queued, for the last job against the job 10
   deep (and their ``pos``).
3. Forecast error (mean absolute percentage of ``expected_time_seconds`` against
   the real completion time) on a queue of 16 mixed stub jobs after warm-up jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.conftest import free_port, start_server, stub_settings  # noqa: E402

BARE_APP = r'''
import io, sys, uuid
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
import uvicorn

buf = io.BytesIO(); Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG"); PNG = buf.getvalue()

async def generate(request):
    body = await request.json()
    return JSONResponse({"task_id": uuid.uuid4().hex[:16], "task_length": 1, "expected_time_seconds": 0.0}, status_code=202)

async def status(request):
    return JSONResponse({"task_id": request.query_params["task_id"], "status": "done", "pos": 0, "wait_remaining": 0})

async def image(request):
    return Response(PNG, media_type="image/png")

app = Starlette(routes=[Route("/api/generate", generate, methods=["POST"]), Route("/api/status", status), Route("/api/image", image)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


def cpu_split(pid: int) -> tuple[float, float]:
    t = psutil.Process(pid).cpu_times()
    return t.user, t.system


def run_jobs(url: str, jobs: int) -> int:
    """submit -> wait (long-poll until done) -> fetch; returns requests sent."""
    sent = 0
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(jobs):
            tid = c.post("/api/generate", json={"prompt": f"job {i}", "width": 16, "height": 16, "steps": 1, "seed": i}).json()["task_id"]
            sent += 1
            while True:
                st = c.get("/api/status", params={"task_id": tid, "wait": 10}).json()
                sent += 1
                if st["status"] == "done":
                    break
            r = c.get("/api/image", params={"task_id": tid, "delete": "true"})
            sent += 1
            assert r.status_code == 200
    return sent


def bench_cpu(tmp: Path, jobs: int, rounds: int) -> None:
    """Alternate rounds of ``jobs`` jobs on easel and on the bare app (so drift in the
    machine's speed hits both alike) and compare the median CPU per job."""
    srv = start_server(tmp, stub_settings())
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port)])
    bare_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(bare_url + "/api/status?task_id=x", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        run_jobs(srv.url, 100)  # warm-up both
        run_jobs(bare_url, 100)
        targets = (("easel", srv.url, srv.proc.pid), ("bare starlette", bare_url, bare.pid))
        per_job: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in targets}
        sent = dict.fromkeys(per_job, 0)
        for _ in range(rounds):
            for name, url, pid in targets:
                u0, s0 = cpu_split(pid)
                sent[name] += run_jobs(url, jobs)
                u1, s1 = cpu_split(pid)
                per_job[name].append(((u1 - u0) / jobs, (s1 - s0) / jobs))
        medians = {}
        for name, samples in per_job.items():
            totals = [u + s for u, s in samples]
            medians[name] = statistics.median(totals)
            print(
                f"  {name:15s} {rounds} rounds of {jobs} jobs ({sent[name] / (rounds * jobs):.2f} requests/job): server CPU {1000 * medians[name]:.3f} ms/job "
                f"(median; user {1000 * statistics.median(u for u, _ in samples):.3f}, sys {1000 * statistics.median(s for _, s in samples):.3f}; "
                f"rounds {' '.join(f'{1000 * t:.3f}' for t in totals)})"
            )
        print(f"  ratio easel / bare: {medians['easel'] / medians['bare starlette']:.2f}x (target <= 2x)")
    finally:
        srv.stop()
        bare.terminate()
        bare.wait()


def submit_many(url: str, n: int, body: dict[str, object]) -> list[str]:
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=8)) as c:
        return [c.post("/api/generate", json=body).json()["task_id"] for _ in range(n)]


def status_latency(c: httpx.Client, probes: list[str], calls: int) -> list[tuple[float, int]]:
    """(median seconds, pos) of a status call for each probe, the probes' calls interleaved."""
    times: list[list[float]] = [[] for _ in probes]
    pos = [-1] * len(probes)
    for _ in range(calls):
        for k, tid in enumerate(probes):
            t0 = time.perf_counter()
            pos[k] = c.get("/api/status", params={"task_id": tid}).json()["pos"]
            times[k].append(time.perf_counter() - t0)
    return [(statistics.median(t), p) for t, p in zip(times, pos, strict=True)]


def bench_status(tmp: Path, calls: int) -> None:
    """With 5,000 jobs queued behind a running one: a status call for the last job
    against one for the job 10 deep, alternating calls in the same queue."""
    srv = start_server(tmp, {**stub_settings(simulate_step_seconds=1000.0), "queue": {"capacity": 10000}})
    c = srv.client
    try:
        blocker = c.post("/api/generate", json={"prompt": "blocker", "steps": 200}).json()["task_id"]
        c.get("/api/status", params={"task_id": blocker, "wait": 10, "since": "waiting"})
        body = {"prompt": "queued", "steps": 4}
        t0 = time.perf_counter()
        ids = submit_many(srv.url, 5000, body)
        submit_s = time.perf_counter() - t0
        status_latency(c, [ids[9], ids[-1]], 200)  # warm-up
        (shallow, pos10), (deep, pos5000) = status_latency(c, [ids[9], ids[-1]], calls)
        print(f"  submitted 5000 jobs in {submit_s:.1f}s ({1000 * submit_s / 5000:.2f} ms each)")
        print(f"  10 deep:   median {1000 * shallow:.3f} ms, pos {pos10} (expected 10)")
        print(f"  5000 deep: median {1000 * deep:.3f} ms, pos {pos5000} (expected 5000)")
        print(f"  ratio deep / shallow: {deep / shallow:.2f}x (target <= 1.2x)")
        c.get("/api/clear")
    finally:
        srv.stop()


def bench_forecast(tmp: Path, seed: int) -> None:
    # 1 s per step per megapixel per image: sizes 256-512, 2-8 steps, n 1-2
    srv = start_server(tmp, stub_settings(simulate_step_seconds=1.0, max_pixels=512 * 512))
    c = srv.client
    rng = random.Random(seed)

    def mixed() -> dict[str, object]:
        return {"prompt": "mixed", "width": rng.choice([256, 320, 384, 512]), "height": rng.choice([256, 384, 512]),
                "steps": rng.randint(2, 8), "n": rng.randint(1, 2)}

    try:
        forecast_error(c, mixed, "stub")
    finally:
        srv.stop()


def forecast_error(c: httpx.Client, mixed: Callable[[], dict[str, object]], model: str, warmup: int = 12, jobs: int = 16) -> float:
    """Run ``warmup`` jobs, then queue ``jobs`` more at once and print the mean
    absolute percentage error of their ``expected_time_seconds`` against the real
    time from submission to completion; returns the MAPE."""

    def wait_all(ids: list[str]) -> list[dict[str, object]]:
        out = []
        for tid in ids:
            while (st := c.get("/api/status", params={"task_id": tid, "wait": 30}).json())["status"] not in ("done", "error"):
                pass
            out.append(st)
        return out

    wait_all([c.post("/api/generate", json=mixed()).json()["task_id"] for _ in range(warmup)])
    subs = [c.post("/api/generate", json=mixed()).json() for _ in range(jobs)]
    finals = wait_all([s["task_id"] for s in subs])
    signed = []
    for s, st in zip(subs, finals, strict=True):
        actual = float(st["finished_at"]) - float(st["created_at"])  # type: ignore[arg-type]
        signed.append((s["expected_time_seconds"] - actual) / actual)
    errors = [abs(e) for e in signed]
    total = max(float(st["finished_at"]) for st in finals) - min(float(st["created_at"]) for st in finals)  # type: ignore[arg-type]
    mape = statistics.mean(errors)
    print(f"  {jobs} mixed jobs, queue drained in {total:.1f}s")
    print(f"  forecast MAPE {100 * mape:.1f}% (median {100 * statistics.median(errors):.1f}%, max {100 * max(errors):.1f}%) (target <= 10%)")
    print(f"  mean signed error {100 * statistics.mean(signed):+.1f}% (+: forecasts too long); per job: {' '.join(f'{100 * e:+.0f}' for e in signed)}")
    learned = next(m for m in c.get("/api/ps").json()["models"] if m["name"] == model)["forecast"]["generate"]
    print(f"  learned: {json.dumps(learned['coefficients'])} (prior {json.dumps(learned['prior'])})")
    return mape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1000, help="jobs per round of the CPU benchmark")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the CPU benchmark, alternating easel and the bare app")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["cpu", "status", "forecast"])
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "cpu"):
            print("1. server CPU per stub job (submit, wait, fetch)")
            bench_cpu(tmp, args.jobs, args.rounds)
        if args.only in (None, "status"):
            print("2. status latency by queue depth")
            bench_status(tmp, args.calls)
        if args.only in (None, "forecast"):
            print("3. forecast error on 16 mixed stub jobs")
            bench_forecast(tmp, args.seed)


if __name__ == "__main__":
    main()
