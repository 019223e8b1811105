"""Fault injection on the Redis broker, end to end (run by hand: ``python bench/bench_faults.py``).

``--jobs`` (200) stub jobs with webhooks, submitted at ``--rate`` a second alternately
through two API nodes to two workers (lease 4 s, heartbeat 1 s,
``broker.timeout_seconds`` 2 s), every 7th accepted job cancelled at once through the
other node, while a script

* pauses a worker (SIGSTOP) past its lease for 6 s,
* pauses redis-server (SIGSTOP) for 15 s,
* kills redis-server (SIGKILL) once and starts it again from its append-only file.

Then it checks: every accepted job ends in one final state; the jobs in Redis are
exactly the accepted submits (none from a refused one); every job's webhook was
received with its final status, with one ``webhook-id``, and its record reads
``ok``; every stored image was written by the step that ended its job (its TTL is
the record's: a fenced attempt's later write would have renewed it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.loopback_http import LoopbackServer  # noqa: E402
from tests.redis_fixtures import RedisServer  # noqa: E402
from tests.servers import RunningServer, start_server, stub_settings  # noqa: E402

FINISHED = ("done", "error", "cancelled")


def settings(hooks: LoopbackServer) -> dict[str, Any]:
    out = stub_settings(simulate_step_seconds=12.0, recommended_steps=4)  # 64x64: ~50 ms a step
    out["broker"] = {"lease_seconds": 4.0, "heartbeat_seconds": 1.0, "timeout_seconds": 2.0}
    out["queue"] = {"shutdown_grace_seconds": 1}
    out["delivery"] = {"allowed_hosts": [hooks.host_port], "retries": 1, "backoff_seconds": 0.2, "timeout_seconds": 5}
    return out


class Run:
    def __init__(self, tmp: Path, jobs: int, rate: float) -> None:
        self.tmp = tmp
        self.jobs = jobs
        self.rate = rate
        self.redis = RedisServer(tmp / "redis")
        self.hooks = LoopbackServer()
        self.accepted: dict[int, str] = {}  # submit number -> task id
        self.refused: dict[int, str | None] = {}  # submit number -> the 503's task id, if it named one
        self.cancelled: set[str] = set()
        self.events: list[str] = []
        self.t0 = time.monotonic()

    def log(self, what: str) -> None:
        line = f"{time.monotonic() - self.t0:6.1f}s {what}"
        self.events.append(line)
        print(line, flush=True)

    def submitter(self, apis: list[RunningServer]) -> None:
        for i in range(self.jobs):
            node = apis[i % 2]
            body = {"prompt": f"job {i}", "seed": i, "webhook_url": self.hooks.url(f"/hook/{i}")}
            try:
                r = node.client.post("/api/generate", json=body)
            except httpx.HTTPError as exc:
                self.refused[i] = None
                self.log(f"submit {i}: {type(exc).__name__}")
                continue
            if r.status_code == 200:
                self.accepted[i] = task_id = r.json()["task_id"]
                if len(self.accepted) % 7 == 0:  # a cancel racing the job's start
                    try:
                        if apis[(i + 1) % 2].client.post("/api/cancel", params={"task_id": task_id}).status_code == 200:
                            self.cancelled.add(task_id)
                    except httpx.HTTPError:
                        pass
            else:
                self.refused[i] = r.json().get("error", {}).get("task_id")
                self.log(f"submit {i}: {r.status_code} (Retry-After {r.headers.get('Retry-After')}, task_id {self.refused[i]})")
            time.sleep(1 / self.rate)  # pacing: the faults land while jobs are submitted

    def faults(self, worker: RunningServer) -> None:
        time.sleep(5)
        self.log("worker paused (SIGSTOP) for 6 s")
        os.kill(worker.proc.pid, signal.SIGSTOP)
        time.sleep(6)
        os.kill(worker.proc.pid, signal.SIGCONT)
        self.log("worker resumed")
        time.sleep(3)
        assert self.redis.proc is not None
        self.log("redis paused (SIGSTOP) for 15 s")
        os.kill(self.redis.proc.pid, signal.SIGSTOP)
        time.sleep(15)
        os.kill(self.redis.proc.pid, signal.SIGCONT)
        self.log("redis resumed")
        time.sleep(5)
        self.log("redis killed (SIGKILL)")
        os.kill(self.redis.proc.pid, signal.SIGKILL)
        self.redis.proc.wait()
        self.redis.proc = None
        time.sleep(1)
        self.redis.start()
        self.log("redis restarted from its AOF")

    def settle(self, apis: list[RunningServer], timeout: float) -> dict[str, dict[str, Any]]:
        """Every accepted job's status once it is final and its webhook no longer
        pending, or as it stands when ``timeout`` has passed."""
        deadline = time.monotonic() + timeout
        finals: dict[str, dict[str, Any]] = {}
        for n, task_id in enumerate(self.accepted.values()):
            st: dict[str, Any] = {"status": "unknown", "webhook": None}
            while True:
                try:
                    r = apis[n % 2].client.get("/api/status", params={"task_id": task_id, "wait": 2})
                    if r.status_code == 200:
                        st = r.json()
                    else:
                        st = {"status": f"HTTP {r.status_code}", "webhook": None}
                except httpx.HTTPError as exc:
                    st = {"status": type(exc).__name__, "webhook": None}
                if (st["status"] in FINISHED and st["webhook"] != "pending") or time.monotonic() > deadline:
                    break
                if st["status"] not in (*FINISHED, "waiting", "running"):
                    time.sleep(0.2)  # Redis not answering yet: no event to wait on
            finals[task_id] = st
        return finals

    def check(self, finals: dict[str, dict[str, Any]]) -> list[str]:
        failures: list[str] = []
        accepted = set(self.accepted.values())
        statuses = Counter(st["status"] for st in finals.values())
        print(f"\nsubmits: {self.jobs}; accepted {len(accepted)}, refused {len(self.refused)} "
              f"({sum(1 for t in self.refused.values() if t)} naming a task id); cancels asked {len(self.cancelled)}")  # fmt: skip
        print(f"final states: {dict(statuses)}; retried (attempt > 1): {sum(1 for s in finals.values() if s.get('attempt', 0) > 1)}")
        unfinished = [t for t, st in finals.items() if st["status"] not in FINISHED]
        if unfinished:
            failures.append(f"{len(unfinished)} accepted jobs not final: {unfinished[:5]}")
        with redis.Redis.from_url(self.redis.url) as db:
            stored = {k.decode().rsplit(":", 1)[1] for k in db.scan_iter("easel:job:*")}
            if stored != accepted:
                failures.append(f"jobs in Redis != accepted submits: {len(stored - accepted)} extra, {len(accepted - stored)} missing")
            fenced = 0
            for task_id, st in finals.items():
                if st["status"] != "done":
                    continue
                job_ttl = db.pttl(f"easel:job:{task_id}")
                for i in range(len(st["images"])):
                    img_ttl = db.pttl(f"easel:img:{task_id}:{i}")
                    if img_ttl < 0 or abs(img_ttl - job_ttl) > 100:
                        fenced += 1
            if fenced:
                failures.append(f"{fenced} images not written by the step that ended their job")
        by_path: dict[str, list[Any]] = {}
        for req in self.hooks.requests:
            by_path.setdefault(req.path, []).append(req)
        for i, task_id in self.accepted.items():
            calls = by_path.get(f"/hook/{i}", [])
            st = finals[task_id]
            if not calls:
                failures.append(f"job {task_id} ({st['status']}): no webhook")
                continue
            bodies = [json.loads(c.body) for c in calls]
            ids = {c.headers.get("webhook-id") for c in calls}
            if ids != {f"msg_{task_id}"} or {b["status"] for b in bodies} != {st["status"]} or st["webhook"] != "ok":
                failures.append(f"job {task_id}: webhooks {[b['status'] for b in bodies]} ids {ids}, final {st['status']}, record {st['webhook']}")
        for i in self.refused:
            if f"/hook/{i}" in by_path:
                failures.append(f"refused submit {i} sent a webhook")
        dup = sum(len(v) - 1 for v in by_path.values())
        print(f"webhooks: {len(self.hooks.requests)} POSTs for {len(by_path)} jobs ({dup} duplicates, same webhook-id)")
        return failures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--rate", type=float, default=5.0, help="submits a second")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="easel-faults-"))
    run = Run(tmp, args.jobs, args.rate)
    run.redis.start()
    nodes: list[RunningServer] = []
    with run.hooks:
        try:
            cfg = settings(run.hooks)
            apis = [start_server(tmp, cfg, ("--broker", run.redis.url, "--role", "api")) for _ in range(2)]
            workers = [start_server(tmp, cfg, ("--broker", run.redis.url, "--role", "worker")) for _ in range(2)]
            nodes = apis + workers
            for n in apis:
                n.client.timeout = httpx.Timeout(10)
            run.t0 = time.monotonic()
            threads = [threading.Thread(target=run.submitter, args=(apis,)), threading.Thread(target=run.faults, args=(workers[0],))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            run.log("submits and faults over; waiting for every job and webhook")
            finals = run.settle(apis, timeout=180)
            run.log("settled")
            failures = run.check(finals)
        finally:
            for n in nodes:
                n.stop(signal.SIGKILL)
            if run.redis.proc is not None:
                os.kill(run.redis.proc.pid, signal.SIGCONT)
            run.redis.stop()
    for f in failures:
        print("FAIL:", f)
    print("all checks met" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
