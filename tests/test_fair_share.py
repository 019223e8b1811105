"""Fair share between keys within a priority, honest positions under it, and moves,
over HTTP on both brokers (Redis: two API nodes and a worker node on one Redis).

A job with the prompt ``hang`` (the stub's test prompts) holds the one worker while
the queue is built, so the order the jobs then start in is the queue's, read from
their ``started_at``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import Cluster
from .redis_fixtures import RedisServer, redis_server_fresh  # noqa: F401 - a fixture
from .servers import RunningServer, start_server, stub_settings

pytestmark = pytest.mark.timeout(180)
Nodes = tuple[RunningServer, RunningServer]


def settings(**queue: Any) -> dict[str, Any]:
    out = stub_settings()
    out["auth"] = {
        "api_keys": [{"key": f"k-{n}", "name": n, "weight": 3 if n == "h" else 1} for n in "abhl"],
        "admin_keys": [{"key": "k-admin", "name": "admin"}],
    }
    out["queue"] = queue
    return out


@pytest.fixture(params=["memory", "redis"])
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Nodes]:
    if request.param == "memory":
        srv = start_server(tmp_path, settings())
        try:
            yield srv, srv
        finally:
            srv.stop()
        return
    redis: RedisServer = request.getfixturevalue("redis_server_fresh")
    cluster = Cluster(tmp_path, redis, settings())
    try:
        first, second = cluster.api(), cluster.api()
        cluster.worker()
        yield first, second
    finally:
        cluster.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer k-{key}"}


def submit(node: RunningServer, key: str, prompt: str = "a fox") -> dict[str, Any]:
    r = node.client.post("/api/generate", json={"prompt": prompt, "steps": 1}, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def status(node: RunningServer, task_id: str, **params: Any) -> dict[str, Any]:
    r = node.client.get("/api/status", params={"task_id": task_id, **params}, headers=auth("admin"))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def until(node: RunningServer, task_id: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Long-polls (each answers at the next status change) until ``done(status)``."""
    st = status(node, task_id)
    for _ in range(40):
        if done(st):
            return st
        st = status(node, task_id, wait=10, since=st["status"])
    raise AssertionError(st)


def finished(st: dict[str, Any]) -> bool:
    return st["status"] in ("done", "error", "cancelled")


def hold(node: RunningServer) -> str:
    """A job that holds the worker until it is cancelled (it is running on return)."""
    task_id = submit(node, "admin", "hang")["task_id"]
    until(node, task_id, lambda st: st["status"] == "running")
    return task_id


def cancel(node: RunningServer, task_id: str) -> None:
    assert node.client.post("/api/cancel", params={"task_id": task_id, "wait": 0}, headers=auth("admin")).status_code == 200


def start_order(node: RunningServer, ids: list[str]) -> list[str]:
    runs = {task_id: until(node, task_id, finished) for task_id in ids}
    assert all(st["status"] == "done" for st in runs.values()), runs
    return sorted(ids, key=lambda task_id: runs[task_id]["started_at"])


def pos(node: RunningServer, task_id: str) -> int:
    return int(status(node, task_id)["pos"])


def test_a_burst_of_one_key_waits_its_turns_and_weights_set_the_share(nodes: Nodes) -> None:
    first, second = nodes
    held = hold(first)
    burst = [submit(first, "a")["task_id"] for _ in range(30)]
    late = submit(second, "b")
    assert late["pos"] == 2  # the running job, then one more of a's
    cancel(first, held)
    order = start_order(second, [*burst, late["task_id"]])
    assert order.index(late["task_id"]) == 1

    held = hold(second)
    heavy = [submit(first, "h")["task_id"] for _ in range(30)]  # weight 3
    light = [submit(second, "l")["task_id"] for _ in range(10)]  # weight 1
    assert pos(first, light[0]) == 1 + 3 and pos(second, light[9]) == 1 + 39  # after every third of h's
    cancel(first, held)
    key = {**dict.fromkeys(heavy, "h"), **dict.fromkeys(light, "l")}
    assert [key[t] for t in start_order(first, heavy + light)] == ["h", "h", "h", "l"] * 10


def test_owners_reorder_their_own_jobs_and_an_admin_puts_one_first(nodes: Nodes) -> None:
    first, second = nodes
    held = hold(first)
    a1, b1, a2, b2, a3 = (submit(first if k == "a" else second, k)["task_id"] for k in "ababa")
    assert [pos(first, t) for t in (a1, b1, a2, b2, a3)] == [1, 2, 3, 4, 5]  # turns: a, b, a, b, a

    moved = second.client.post(f"/api/tasks/{a3}/move", json={"to": "front"}, headers=auth("a"))
    assert moved.status_code == 200, moved.text
    assert moved.json()["pos"] == 1  # a's first turn, b's jobs keep theirs
    assert [pos(first, t) for t in (a3, b1, a1, b2, a2)] == [1, 2, 3, 4, 5]

    other = first.client.post(f"/api/tasks/{a1}/move", json={"to": "front"}, headers=auth("b"))
    assert other.status_code == 404  # another key's job is unknown to b

    back = first.client.post(f"/api/tasks/{a3}/move", json={"to": "back"}, headers=auth("a"))
    assert back.status_code == 200 and back.json()["pos"] == 5

    admin = first.client.post(f"/api/tasks/{b2}/move", json={"to": "front"}, headers=auth("admin"))
    assert admin.status_code == 200 and admin.json()["pos"] == 1  # first of its priority
    assert [pos(second, t) for t in (b2, a1, b1, a2, a3)] == [1, 2, 3, 4, 5]

    running = first.client.post(f"/api/tasks/{held}/move", json={"to": "back"}, headers=auth("admin"))
    assert running.status_code == 409 and running.json()["error"]["code"] == "job_not_waiting"
    bad = first.client.post(f"/api/tasks/{a1}/move", json={"to": "middle"}, headers=auth("a"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "to", bad.text
    cancel(first, held)
    assert start_order(second, [a1, b1, a2, b2, a3]) == [b2, a1, b1, a2, a3]


def test_fifo_keeps_arrival_order_and_owners_cannot_move(tmp_path: Path) -> None:
    srv = start_server(tmp_path, settings(fairness="fifo"))
    try:
        held = hold(srv)
        burst = [submit(srv, "a")["task_id"] for _ in range(5)]
        late = submit(srv, "b")
        assert late["pos"] == 6
        refused = srv.client.post(f"/api/tasks/{late['task_id']}/move", json={"to": "front"}, headers=auth("b"))
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "queue_not_fair"
        admin = srv.client.post(f"/api/tasks/{late['task_id']}/move", json={"to": "front"}, headers=auth("admin"))
        assert admin.status_code == 200 and admin.json()["pos"] == 1
        cancel(srv, held)
        assert start_order(srv, [*burst, late["task_id"]])[0] == late["task_id"]
    finally:
        srv.stop()
