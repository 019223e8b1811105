"""An admin pauses and resumes a model's queue, or every queue, on both brokers:
running jobs finish, nothing new starts while the queue grows, statuses and the
model listing say "paused", and the queue drains once it resumes.  In Redis mode
the pause lives in Redis: a node started later sees it and resumes it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .cluster import Cluster
from .redis_fixtures import RedisServer, redis_server_fresh  # noqa: F401 - a fixture
from .servers import BROKERS, RunningServer, stub_settings
from .test_api import wait_done, wait_running

ALICE = {"Authorization": "Bearer alice-key"}
ROOT = {"Authorization": "Bearer root-key"}
AUTH = {"api_keys": [{"key": "alice-key", "name": "alice"}], "admin_keys": [{"key": "root-key", "name": "root"}]}


def settings() -> dict[str, Any]:
    cfg = stub_settings(simulate_step_seconds=12.0)  # 0.05 s a step at 64x64
    cfg["models"]["other"] = {**cfg["models"]["stub"], "simulate_step_seconds": 0.0}
    return {**cfg, "auth": AUTH}


@pytest.fixture(scope="module", params=BROKERS)
def srv(request: pytest.FixtureRequest, server_factory: Callable[..., RunningServer], broker_args: Any) -> RunningServer:
    cfg, args = broker_args(settings(), request.param)
    return server_factory(cfg, *args)


@pytest.fixture
def alice(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, headers=ALICE, timeout=60) as c:
        yield c


def submit(c: httpx.Client, model: str = "stub", steps: int = 2) -> str:
    r = c.post("/api/generate", json={"prompt": "a paused fox", "model": model, "steps": steps})
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


def still_waiting(c: httpx.Client, task_id: str, seconds: float = 1.0) -> dict[str, Any]:
    """Long-poll: the status after ``seconds`` without a change (a change answers at once)."""
    st: dict[str, Any] = c.get("/api/status", params={"task_id": task_id, "wait": seconds, "since": "waiting"}).json()
    assert st["status"] == "waiting", st
    return st


def model_of(srv: RunningServer, name: str) -> dict[str, Any]:
    models = srv.client.get("/v1/admin/models", headers=ROOT).json()["models"]
    return next(m for m in models if m["name"] == name)


def test_a_paused_queue_lets_the_running_job_finish_starts_nothing_and_drains_on_resume(srv: RunningServer, alice: httpx.Client) -> None:
    running = submit(alice, steps=20)  # about a second
    wait_running(alice, running)
    r = srv.client.post("/v1/admin/models/stub/pause", headers=ROOT)
    assert r.status_code == 200 and r.json()["paused"] is True, r.text
    queued = [submit(alice) for _ in range(4)]
    assert wait_done(alice, running)["status"] == "done"  # the running job finished
    assert wait_done(alice, submit(alice, "other"))["status"] == "done"  # another model's queue runs on
    st = still_waiting(alice, queued[0])
    assert st["paused"] is True and "paused" in st["message"] and "wait_remaining" not in st
    assert [still_waiting(alice, t, 0)["pos"] for t in queued] == [0, 1, 2, 3]
    assert model_of(srv, "stub")["paused"] is True and model_of(srv, "stub")["queue_depth"] == 4
    assert model_of(srv, "other")["paused"] is False
    more = submit(alice)  # submissions still queue
    assert model_of(srv, "stub")["queue_depth"] == 5 and model_of(srv, "stub")["running"] == 0
    resumed_at = time.time()
    r = srv.client.post("/v1/admin/models/stub/resume", headers=ROOT)
    assert r.status_code == 200 and r.json()["paused"] is False
    done = [wait_done(alice, t) for t in [*queued, more]]
    assert all(st["status"] == "done" and st["started_at"] >= resumed_at - 0.05 for st in done), done


def test_pausing_every_queue_holds_every_model_until_every_queue_resumes(srv: RunningServer, alice: httpx.Client) -> None:
    r = srv.client.post("/v1/admin/queue/pause", headers=ROOT)
    assert r.status_code == 200 and r.json() == {"all": True, "models": []}
    a, b = submit(alice), submit(alice, "other")
    assert still_waiting(alice, b)["paused"] is True
    assert model_of(srv, "other")["paused"] is True
    srv.client.post("/v1/admin/models/other/resume", headers=ROOT)  # its own pause was never set: every queue's holds it
    assert still_waiting(alice, b, 0.5)["paused"] is True
    r = srv.client.post("/v1/admin/queue/resume", headers=ROOT)
    assert r.json() == {"all": False, "models": []}
    assert wait_done(alice, a)["status"] == wait_done(alice, b)["status"] == "done"


def test_a_follower_of_a_waiting_job_hears_of_the_pause_at_once(srv: RunningServer, alice: httpx.Client) -> None:
    ahead = submit(alice, steps=200)  # 10 s: the job behind it waits meanwhile
    wait_running(alice, ahead)
    behind = submit(alice)
    seen: list[bool] = []
    try:
        with alice.stream("GET", "/api/events", params={"task_id": behind, "heartbeat": 60}, timeout=10) as r:
            for line in r.iter_lines():  # a pause that woke nobody: no event before the read times out
                if not line.startswith("data: ") or '"task_id"' not in line:
                    continue
                seen.append(json.loads(line[6:])["paused"])
                if len(seen) == 1:
                    assert srv.client.post("/v1/admin/models/stub/pause", headers=ROOT).status_code == 200
                elif seen[-1]:
                    break
    finally:
        srv.client.post("/v1/admin/models/stub/resume", headers=ROOT)
        alice.delete(f"/api/tasks/{behind}")
        alice.delete(f"/api/tasks/{ahead}")
    assert seen[0] is False and seen[-1] is True


def test_only_an_admin_pauses_and_an_unknown_model_is_a_404(srv: RunningServer) -> None:
    assert srv.client.post("/v1/admin/models/stub/pause", headers=ALICE).status_code == 403
    assert srv.client.post("/v1/admin/queue/pause", headers=ALICE).status_code == 403
    r = srv.client.post("/v1/admin/models/nope/pause", headers=ROOT)
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    assert model_of(srv, "stub")["paused"] is False


@pytest.fixture
def cluster(tmp_path: Path, redis_server_fresh: RedisServer) -> Iterator[Cluster]:  # noqa: F811
    c = Cluster(tmp_path, redis_server_fresh, settings())
    try:
        yield c
    finally:
        c.stop()


def test_the_pause_lives_in_redis_every_worker_honours_it_and_a_new_api_node_resumes_it(cluster: Cluster) -> None:
    first = cluster.api()
    cluster.worker()
    cluster.worker()
    first.client.post("/v1/admin/models/other/pause", headers=ROOT)
    with httpx.Client(base_url=first.url, headers=ALICE, timeout=60) as c:
        queued = [submit(c, "other") for _ in range(6)]
        still_waiting(c, queued[0])
    first.stop()  # the node that paused it is gone
    second = cluster.api()
    assert model_of(second, "other")["paused"] is True
    with httpx.Client(base_url=second.url, headers=ALICE, timeout=60) as c:
        assert still_waiting(c, queued[-1], 0.5)["paused"] is True
        assert model_of(second, "other")["queue_depth"] == 6 and model_of(second, "other")["running"] == 0
        second.client.post("/v1/admin/models/other/resume", headers=ROOT)
        assert {wait_done(c, t)["status"] for t in queued} == {"done"}
