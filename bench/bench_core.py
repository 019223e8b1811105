"""Core server benchmarks (run by hand: ``python bench/bench_core.py``).

1. Status latency, with 5,000 jobs queued behind a running one, for the last job
   against the job 10 deep (and their ``pos``), on the memory broker (one process,
   role all) and on Redis (a redis-server in a temp dir, one ``--role api`` node
   that answers the status calls and one ``--role worker`` node that holds the
   blocking job).
2. Forecast error (mean absolute percentage of ``expected_time_seconds`` against
   the real completion time) on a queue of 16 mixed stub jobs after warm-up jobs
   (memory broker).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.nodes import cluster  # noqa: E402
from tests.servers import RunningServer, start_server, stub_settings  # noqa: E402

KEYS = [f"bench-key-{k}" for k in range(4)]  # the status bench's jobs come from these keys in turn (fair share)
ADMIN = {"Authorization": "Bearer bench-admin"}


def submit_many(url: str, n: int, body: dict[str, object], keys: list[str] | None = None) -> list[str]:
    """``n`` jobs; with ``keys``: job i from key i % len(keys)."""
    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=8)) as c:
        heads = [{"Authorization": f"Bearer {k}"} for k in keys or []] or [{}]
        return [c.post("/api/generate", json=body, headers=heads[i % len(heads)]).json()["task_id"] for i in range(n)]


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


def wait_running(c: httpx.Client, task_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (st := c.get("/api/status", params={"task_id": task_id, "wait": 1, "since": "waiting"}).json())["status"] != "running":
        if time.monotonic() > deadline or st["status"] in ("done", "error", "cancelled"):
            raise RuntimeError(f"blocker job did not start: {st}")


@contextmanager
def status_cluster(tmp: Path, broker: str) -> Iterator[RunningServer]:
    """The node that answers status calls: memory (one process, role all) or Redis
    (redis-server + one api node + one worker node)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {**stub_settings(simulate_step_seconds=1000.0), "queue": {"capacity": 10000, "shutdown_grace_seconds": 1},
           "auth": {"api_keys": KEYS, "admin_keys": ["bench-admin"]}}  # fmt: skip
    with cluster(tmp, broker, cfg, headers=ADMIN) as (srv, _pids):
        yield srv


def bench_status(tmp: Path, calls: int, broker: str, depth: int = 5000) -> tuple[float, float]:
    """With ``depth`` jobs queued behind a running one, from four keys in turn (fair
    share on: four lanes, in the order they arrived): a status call for the last job
    against one for the job 10 deep, alternating calls in the same queue."""
    with status_cluster(tmp, broker) as srv:
        c = srv.client
        c.headers.update(ADMIN)
        blocker = c.post("/api/generate", json={"prompt": "blocker", "steps": 200}).json()["task_id"]
        wait_running(c, blocker)
        body = {"prompt": "queued", "steps": 4}
        t0 = time.perf_counter()
        ids = submit_many(srv.url, depth, body, KEYS)
        submit_s = time.perf_counter() - t0
        status_latency(c, [ids[9], ids[-1]], 200)  # warm-up
        (shallow, pos10), (deep, posn) = status_latency(c, [ids[9], ids[-1]], calls)
        print(f"  [{broker}] submitted {depth} jobs in {submit_s:.1f}s ({1000 * submit_s / depth:.2f} ms each)")
        print(f"  [{broker}] 10 deep:   median {1000 * shallow:.3f} ms, pos {pos10} (expected 10)")
        print(f"  [{broker}] {depth} deep: median {1000 * deep:.3f} ms, pos {posn} (expected {depth})")
        print(f"  [{broker}] ratio deep / shallow: {deep / shallow:.2f}x (target <= 1.2x)")
        c.get("/api/clear")
        c.get("/api/cancel", params={"task_id": blocker})
    return shallow, deep


def bench_forecast(tmp: Path, seed: int) -> None:
    # 1 s per step per megapixel per image: sizes 256-512, 2-8 steps, n 1-2
    srv = start_server(tmp, stub_settings(simulate_step_seconds=1.0, max_pixels=512 * 512))
    c = srv.client
    rng = random.Random(seed)

    def mixed() -> dict[str, object]:
        return {"prompt": "mixed", "width": rng.choice([256, 320, 384, 512]), "height": rng.choice([256, 384, 512]),
                "steps": rng.randint(2, 8), "n": rng.randint(1, 2)}  # fmt: skip

    try:
        forecast_error(c, mixed, "stub")
    finally:
        srv.stop()


def forecast_error(
    c: httpx.Client, mixed: Callable[[], dict[str, object]], model: str, warmup: int = 12, jobs: int = 16, timeout: float = 600
) -> float:
    """Run ``warmup`` jobs, then queue ``jobs`` more at once and print the mean
    absolute percentage error of their ``expected_time_seconds`` against the real
    time from submission to completion; returns the MAPE."""
    deadline = time.monotonic() + timeout

    def wait_all(ids: list[str]) -> list[dict[str, Any]]:
        out = []
        for tid in ids:
            while (st := c.get("/api/status", params={"task_id": tid, "wait": 30}).json())["status"] not in ("done", "error", "cancelled"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"forecast bench: job {tid} not finished in {timeout}s: {st}")
            out.append(st)
        return out

    wait_all([c.post("/api/generate", json=mixed()).json()["task_id"] for _ in range(warmup)])
    subs = [c.post("/api/generate", json=mixed()).json() for _ in range(jobs)]
    finals = wait_all([s["task_id"] for s in subs])
    signed = []
    for s, st in zip(subs, finals, strict=True):
        actual = float(st["finished_at"]) - float(st["created_at"])
        signed.append((s["expected_time_seconds"] - actual) / actual)
    errors = [abs(e) for e in signed]
    total = max(float(st["finished_at"]) for st in finals) - min(float(st["created_at"]) for st in finals)
    mape = statistics.mean(errors)
    print(f"  {jobs} mixed jobs, queue drained in {total:.1f}s")
    print(f"  forecast MAPE {100 * mape:.1f}% (median {100 * statistics.median(errors):.1f}%, max {100 * max(errors):.1f}%) (target <= 10%)")
    print(f"  mean signed error {100 * statistics.mean(signed):+.1f}% (+: forecasts too long); per job: {' '.join(f'{100 * e:+.0f}' for e in signed)}")
    learned = next(m for m in c.get("/api/ps").json()["models"] if m["name"] == model)["forecast"]["image"]
    print(f"  learned seconds: {json.dumps(learned['seconds'])} (prior {json.dumps(learned['prior_seconds'])})")
    return mape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1000, help="status calls per probe")
    p.add_argument("--depth", type=int, default=5000, help="jobs queued for the status measure")
    p.add_argument("--broker", choices=["memory", "redis", "both"], default="both", help="broker(s) of the status measure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["status", "forecast"])
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="easel-bench-") as d:
        tmp = Path(d)
        if args.only in (None, "status"):
            print(f"1. status latency by queue depth ({args.calls} calls per probe)")
            results = {}
            for broker in ("memory", "redis") if args.broker == "both" else (args.broker,):
                results[broker] = bench_status(tmp / broker, args.calls, broker, args.depth)
            print(f"  {'broker':8s} {'10 deep ms':>10s} {f'{args.depth} deep ms':>12s} {'ratio':>6s}")
            for broker, (shallow, deep) in results.items():
                print(f"  {broker:8s} {1000 * shallow:10.3f} {1000 * deep:12.3f} {deep / shallow:6.2f}")
        if args.only in (None, "forecast"):
            print("2. forecast error on 16 mixed stub jobs")
            bench_forecast(tmp, args.seed)


if __name__ == "__main__":
    main()
