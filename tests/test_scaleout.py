"""Several easel processes on one real redis-server: API nodes and workers as
separate ``python server.py --broker redis://... --role ...`` processes on loopback,
killed and restarted mid-run.  Leases are short (1 s) so faults show in seconds."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .cluster import Cluster
from .redis_fixtures import RedisServer, redis_server_fresh  # noqa: F401 - a fixture
from .servers import RunningServer, stub_settings

LEASE = {"lease_seconds": 1.0, "heartbeat_seconds": 0.25}


def settings(**model: Any) -> dict[str, Any]:
    out = stub_settings(**model)
    out["broker"] = dict(LEASE)
    out["queue"] = {"shutdown_grace_seconds": 5}
    return out


@pytest.fixture
def cluster(tmp_path: Path, redis_server_fresh: RedisServer) -> Iterator[Cluster]:  # noqa: F811
    c = Cluster(tmp_path, redis_server_fresh, settings())
    try:
        yield c
    finally:
        c.stop()


def submit(node: RunningServer, **body: Any) -> str:
    r = node.client.post("/api/generate", json={"prompt": "a red fox", **body})
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


def status(node: RunningServer, task_id: str, **params: Any) -> dict[str, Any]:
    r = node.client.get("/api/status", params={"task_id": task_id, **params})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def wait_for(node: RunningServer, task_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """Until ``done(status)`` holds: long-polls of half a second (a status change
    answers at once; a step does not, so progress is read twice a second)."""
    deadline = time.monotonic() + timeout
    st = status(node, task_id)
    while not done(st):
        assert time.monotonic() < deadline and not finished(st), st  # over, or ended otherwise
        st = status(node, task_id, wait=0.5)
    return st


def finished(st: dict[str, Any]) -> bool:
    return st["status"] in ("done", "error", "cancelled")


def done_lines(*nodes: RunningServer, at_least: int = 0, timeout: float = 10.0) -> list[str]:
    """Job ids in the 'done' log lines of the given workers, once there are ``at_least``
    of them (or ``timeout`` has passed): a worker writes the line when the finish
    script has answered it, which can be after an API node, woken by the same script,
    has answered a client that the job is done."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for node in nodes for m in re.findall(r"job (\w+) on \w+: done", node.log())]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def sse_events(node: RunningServer, task_id: str, timeout: float = 60) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{node.url}/api/events", params={"task_id": task_id}, timeout=timeout) as r:
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "status":
                events.append(json.loads(line[6:]))
            elif line.startswith("data: ") and kind == "end":
                break
    return events


# ----------------------------------------------------------------------------- tests


def test_a_job_submitted_on_one_api_node_runs_on_a_worker_and_streams_on_another(cluster: Cluster) -> None:
    cfg = settings(simulate_step_seconds=40.0, recommended_steps=6)  # ~0.16 s a step at 64x64
    a, b = cluster.api(cfg), cluster.api(cfg)
    cluster.worker(cfg)
    task_id = submit(a)
    events = sse_events(b, task_id)
    assert events[-1]["status"] == "done" and events[-1]["progress"] == 1.0
    steps = [e["step"] for e in events if e["status"] == "running"]
    assert steps == sorted(steps) and len(set(steps)) >= 3, steps  # progress, not just the end
    image = b.client.get("/api/image", params={"task_id": task_id})
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_sse_reconnecting_with_last_event_id_is_not_sent_the_same_state_again(cluster: Cluster) -> None:
    cfg = settings(simulate_step_seconds=120.0, recommended_steps=40)  # 0.5 s a step
    a, b = cluster.api(cfg), cluster.api(cfg)
    cluster.worker(cfg)
    task_id = submit(a)
    wait_for(a, task_id, lambda st: st["status"] == "running")

    def first_event(headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
        with httpx.stream("GET", f"{b.url}/api/events", params={"task_id": task_id}, headers=headers, timeout=30) as r:
            ident = ""
            for line in r.iter_lines():
                if line.startswith("id: "):
                    ident = line[4:]
                elif line.startswith("data: "):
                    return ident, json.loads(line[6:])
        raise AssertionError("the stream ended without an event")

    ident, first = first_event({})
    again, second = first_event({"Last-Event-ID": ident})
    assert again != ident and second != first  # resumed: the next event is a change
    assert second["step"] >= first["step"]
    a.client.get("/api/cancel", params={"task_id": task_id})


def test_cancel_on_another_node_stops_a_running_job_within_a_step(cluster: Cluster) -> None:
    cfg = settings(simulate_step_seconds=120.0, recommended_steps=200)  # 0.5 s a step: 100 s in all
    a, b = cluster.api(cfg), cluster.api(cfg)
    cluster.worker(cfg)
    task_id = submit(a)
    before = wait_for(a, task_id, lambda st: st["status"] == "running" and st["step"] >= 1)["step"]
    t0 = time.monotonic()
    r = b.client.get("/api/cancel", params={"task_id": task_id})
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert time.monotonic() - t0 < 3
    st = status(a, task_id)
    assert st["status"] == "cancelled" and st["step"] <= before + 4, (before, st["step"])  # 0.5 s a step


def test_a_worker_killed_mid_job_is_noticed_and_its_job_runs_once_more_elsewhere(cluster: Cluster) -> None:
    slow = settings(simulate_step_seconds=60.0, recommended_steps=60)  # ~0.25 s a step: 15 s
    api = cluster.api(slow)
    w1 = cluster.worker(slow)
    task_id = submit(api)
    st = wait_for(api, task_id, lambda st: st["status"] == "running" and st["step"] >= 2)
    first = st["worker"]
    w2 = cluster.worker(slow)
    victim = w1 if first.split(":")[1] == str(w1.proc.pid) else w2
    victim.proc.kill()  # SIGKILL: no goodbye, the lease just stops being renewed
    st = wait_for(api, task_id, finished, timeout=60)
    assert st["status"] == "done" and st["attempt"] == 2, st
    assert st["worker"] != first
    survivor = w2 if victim is w1 else w1
    assert done_lines(survivor, at_least=1).count(task_id) == 1


def test_jobs_queued_survive_restarts_of_redis_and_every_node(cluster: Cluster) -> None:
    api = cluster.api()
    ids = [submit(api, seed=i) for i in range(20)]  # no worker yet: they wait
    st = status(api, ids[-1])
    assert st["status"] == "waiting" and st["pos"] == 19
    assert "wait_remaining" not in st and "no worker" in st["message"]  # no guess
    api.stop()
    cluster.redis.restart()  # AOF: what was acknowledged is back
    api = cluster.api()
    worker = cluster.worker()
    for task_id in ids:
        assert wait_for(api, task_id, finished)["status"] == "done"
    assert sorted(done_lines(worker, at_least=len(ids))) == sorted(ids)


def test_priority_and_positions_are_exact_across_api_nodes(cluster: Cluster) -> None:
    a, b = cluster.api(), cluster.api()
    normal = [submit(a if i % 2 else b, seed=i) for i in range(6)]
    urgent = submit(b, priority=True)
    assert [status(a, t)["pos"] for t in normal] == list(range(1, 7))  # behind the priority job
    assert status(a, urgent)["pos"] == 0
    assert status(b, normal[0])["pos"] == 1
    r = a.client.get("/api/tasks").json()
    assert [j["task_id"] for j in r["queue"]] == [urgent, *normal]


def test_forecasts_count_the_live_workers(cluster: Cluster) -> None:
    cfg = settings(simulate_step_seconds=25.0, recommended_steps=4, forecast_prior={"step_mp": 25.0})  # 0.1 s a step
    api = cluster.api(cfg)
    w1 = cluster.worker(cfg)
    blocker = submit(api, steps=200)  # 20 s: both lanes busy with long jobs first
    wait_for(api, blocker, lambda st: st["status"] == "running")
    ids = [submit(api, seed=i) for i in range(10)]
    one = status(api, ids[-1])["wait_remaining"]
    cluster.worker(cfg)
    deadline = time.monotonic() + 10
    two = status(api, ids[-1])["wait_remaining"]
    while two > 0.75 * one and time.monotonic() < deadline:  # presence is refreshed every 0.5 s
        time.sleep(0.1)
        two = status(api, ids[-1])["wait_remaining"]
    assert two < 0.75 * one, (one, two)
    models = api.client.get("/v1/admin/models").json()["models"]
    assert len(models[0]["workers"]) == 2
    w1.proc.kill()


def test_sigterm_on_a_worker_releases_its_job_to_the_others_and_cancels_nothing(cluster: Cluster) -> None:
    slow = settings(simulate_step_seconds=60.0, recommended_steps=40)  # ~10 s a job: past the grace
    slow["queue"] = {"shutdown_grace_seconds": 0.5}
    api = cluster.api(slow)
    w1 = cluster.worker(slow)
    first = submit(api)
    queued = [submit(api, steps=1, seed=i) for i in range(3)]
    wait_for(api, first, lambda st: st["status"] == "running")
    assert w1.stop(signal.SIGTERM) == 0
    st = status(api, first)
    assert st["status"] == "waiting" and st["pos"] == 0, st  # back at the head, not cancelled
    w2 = cluster.worker(settings(simulate_step_seconds=2.0))
    for task_id in [first, *queued]:
        assert wait_for(api, task_id, finished)["status"] == "done"
    assert status(api, first)["attempt"] == 2
    assert set(done_lines(w2, at_least=1 + len(queued))) == {first, *queued}


def test_redis_down_answers_503_and_loses_nothing_already_accepted(cluster: Cluster) -> None:
    api = cluster.api()
    task_id = submit(api)
    cluster.redis.stop()
    r = api.client.post("/api/generate", json={"prompt": "x"})
    assert r.status_code == 503 and "Redis" in r.json()["error"]["message"], r.text
    cluster.redis.start()
    worker = cluster.worker()
    assert wait_for(api, task_id, finished)["status"] == "done"
    assert done_lines(worker, at_least=1) == [task_id]


def test_model_admin_reaches_the_workers(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    deadline = time.monotonic() + 10
    while not api.client.get("/v1/models").json()["data"] and time.monotonic() < deadline:
        time.sleep(0.1)  # presence arrives with the worker's first heartbeat
    assert [m["id"] for m in api.client.get("/v1/models").json()["data"]] == ["stub"]
    assert api.client.post("/v1/admin/models/stub/unload").status_code == 200
    while api.client.get("/v1/models").json()["data"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert api.client.get("/v1/models").json()["data"] == []
    assert api.client.post("/v1/admin/models/stub/load").status_code == 200
    while not api.client.get("/v1/models").json()["data"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [m["id"] for m in api.client.get("/v1/models").json()["data"]] == ["stub"]
