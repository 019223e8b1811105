"""Fault tolerance of the Redis broker (run by hand: ``python bench/bench_scaleout.py``).

Stub jobs (64x64, 2 steps, ~16 ms a step: ~35 ms a job), a short lease (1 s,
heartbeat 0.25 s), every process a real ``python server.py --broker redis://...``
on loopback, one redis-server (AOF) in a temp dir.

a. ``--jobs`` (1,000) jobs submitted alternately through two API nodes to two
   workers; after 30% of the submissions one worker is SIGKILLed, after 50% one API
   node is restarted (SIGTERM, then started again on a new port; the other node
   takes the submissions meanwhile).  Then: every job ended ``done``, and across
   both workers' logs every job id has exactly one ``done`` line.
b. ``--queued`` (200) jobs queued with no worker alive; the API node is stopped,
   redis-server restarted (SIGTERM: the AOF is flushed; reloaded on start), then an
   API node and a worker started: every job completes, once.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.redis_fixtures import RedisServer  # noqa: E402
from tests.servers import RunningServer, start_server, stub_settings  # noqa: E402

FINISHED = ("done", "error", "cancelled")


def settings() -> dict[str, Any]:
    out = stub_settings(simulate_step_seconds=4.0, recommended_steps=2)  # 64x64: 16 ms a step
    out["broker"] = {"lease_seconds": 1.0, "heartbeat_seconds": 0.25}
    out["queue"] = {"shutdown_grace_seconds": 5}
    return out


def node(tmp: Path, redis: RedisServer, role: str) -> RunningServer:
    return start_server(tmp, settings(), ("--broker", redis.url, "--role", role))


def submit(n: RunningServer, i: int) -> str:
    r = n.client.post("/api/generate", json={"prompt": f"job {i}", "seed": i})
    if r.status_code not in (200, 202):  # 202 before the submit answer became 200
        raise RuntimeError(f"submit {i} on {n.url}: {r.status_code} {r.text}")
    return str(r.json()["task_id"])


def wait_all(n: RunningServer, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    out: dict[str, dict[str, Any]] = {}
    for tid in ids:
        while (st := n.client.get("/api/status", params={"task_id": tid, "wait": 5}).json())["status"] not in FINISHED:
            if time.monotonic() > deadline:
                print(f"  TIMEOUT after {timeout}s: job {tid} still {st['status']} (pos {st['pos']})")
                out[tid] = st
                break
        out[tid] = st
    return out


def done_lines(*nodes: RunningServer) -> Counter[str]:
    return Counter(m for n in nodes for m in re.findall(r"job (\w+) on \w+: done", n.log()))


def report(ids: list[str], finals: dict[str, dict[str, Any]], workers: list[RunningServer]) -> bool:
    statuses = Counter(finals[t]["status"] for t in ids)
    lines = done_lines(*workers)
    once = sum(1 for t in ids if lines[t] == 1)
    never = [t for t in ids if lines[t] == 0]
    twice = [t for t in ids if lines[t] > 1]
    foreign = [t for t in lines if t not in set(ids)]
    retried = [t for t in ids if int(finals[t].get("attempt", 0)) > 1]
    print(f"  {'jobs submitted':34s} {len(ids):6d}")
    for status in ("done", "error", "cancelled", "waiting", "running"):
        print(f"  {'ended ' + status:34s} {statuses.get(status, 0):6d}")
    print(f"  {'exactly one done line':34s} {once:6d}")
    print(f"  {'no done line (lost)':34s} {len(never):6d}")
    print(f"  {'more than one done line':34s} {len(twice):6d}")
    print(f"  {'done lines of unknown ids':34s} {len(foreign):6d}")
    print(f"  {'attempt > 1':34s} {len(retried):6d}")
    for t in retried[:10]:
        print(f"    {t}: attempt {finals[t]['attempt']}, worker {finals[t]['worker']}, done lines {lines[t]}")
    for t in (never + twice)[:10]:
        print(f"    {t}: {finals[t]['status']} attempt {finals[t]['attempt']} done lines {lines[t]}")
    ok = statuses.get("done", 0) == len(ids) and once == len(ids) and not foreign
    print(f"  {'ALL DONE, EXACTLY ONCE' if ok else 'FAILED'}")
    return ok


def bench_faults(tmp: Path, jobs: int, timeout: float) -> bool:
    redis = RedisServer(tmp / "redis")
    redis.start()
    nodes: list[RunningServer] = []
    try:
        a, b = node(tmp, redis, "api"), node(tmp, redis, "api")
        w1, w2 = node(tmp, redis, "worker"), node(tmp, redis, "worker")
        nodes += [a, b, w1, w2]
        apis = [a, b]
        kill_at, restart_at = int(0.3 * jobs), int(0.5 * jobs)
        ids: list[str] = []
        events = []
        t0 = time.monotonic()
        for i in range(jobs):
            if i == kill_at:
                w1.proc.kill()  # SIGKILL: its running job's lease just stops being renewed
                w1.proc.wait()
                events.append(f"worker {w1.url} SIGKILLed after {i} submissions at {time.monotonic() - t0:.2f}s")
            if i == restart_at:
                r0 = time.monotonic()
                old = apis[0]
                rc = old.stop(signal.SIGTERM)
                down = time.monotonic() - r0
                ids.append(submit(apis[1], i))  # the other node takes this one while the first is down
                apis[0] = node(tmp, redis, "api")
                nodes.append(apis[0])
                events.append(f"api {old.url} SIGTERM (rc {rc}, {down:.2f}s), restarted as {apis[0].url} "
                              f"in {time.monotonic() - r0:.2f}s after {i} submissions")  # fmt: skip
                continue
            ids.append(submit(apis[i % 2], i))
        submit_s = time.monotonic() - t0
        finals = wait_all(apis[1], ids, timeout)
        wall = time.monotonic() - t0
        for e in events:
            print(f"  {e}")
        print(f"  submitted {len(ids)} jobs in {submit_s:.2f}s; all finished {wall:.2f}s after the first submission")
        return report(ids, finals, [w1, w2])
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)
        redis.stop()


def bench_restart_all(tmp: Path, queued: int, timeout: float) -> bool:
    redis = RedisServer(tmp / "redis")
    redis.start()
    nodes: list[RunningServer] = []
    try:
        api = node(tmp, redis, "api")
        nodes.append(api)
        ids = [submit(api, i) for i in range(queued)]
        last = api.client.get("/api/status", params={"task_id": ids[-1]}).json()
        print(f"  {queued} jobs queued with no worker; last job: {last['status']}, pos {last['pos']}")
        t0 = time.monotonic()
        rc = api.stop(signal.SIGTERM)
        redis.restart()
        api = node(tmp, redis, "api")
        nodes.append(api)
        back = api.client.get("/api/status", params={"task_id": ids[-1]}).json()
        t1 = time.monotonic()
        worker = node(tmp, redis, "worker")
        nodes.append(worker)
        t2 = time.monotonic()
        finals = wait_all(api, ids, timeout)
        t3 = time.monotonic()
        print(f"  api stopped (rc {rc}), redis restarted, api up again: {t1 - t0:.2f}s; last job then {back['status']}, pos {back['pos']}")
        print(f"  worker started in {t2 - t1:.2f}s; all {queued} finished {t3 - t2:.2f}s later ({t3 - t0:.2f}s after the stop)")
        return report(ids, finals, [worker])
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)
        redis.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=1000, help="jobs of the kill/restart run (a)")
    p.add_argument("--queued", type=int, default=200, help="jobs queued across the full restart (b)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the jobs to finish")
    p.add_argument("--only", choices=["faults", "restart"])
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ok = True
    with tempfile.TemporaryDirectory(prefix="easel-scaleout-") as d:
        tmp = Path(d)
        if args.only in (None, "faults"):
            print(f"a. {args.jobs} stub jobs, 2 API nodes, 2 workers, lease 1 s: a worker SIGKILLed, an API node restarted")
            (tmp / "a").mkdir()
            ok &= bench_faults(tmp / "a", args.jobs, args.timeout)
        if args.only in (None, "restart"):
            print(f"b. {args.queued} jobs queued; API node, redis-server and then every node restarted")
            (tmp / "b").mkdir()
            ok &= bench_restart_all(tmp / "b", args.queued, args.timeout)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
