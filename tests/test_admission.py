"""Quotas and idempotency keys decided in the step that queues the job: concurrent
submissions for one key never get past ``max_queued``, and one Idempotency-Key never
makes two jobs, whether they reach two API nodes on one Redis or one memory-broker
server at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from .cluster import Cluster
from .redis_fixtures import RedisServer
from .servers import RunningServer, free_port, stub_settings

CAPPED = {"Authorization": "Bearer capped-key"}
KEYED = {"Authorization": "Bearer keyed-key"}
ROOT = {"Authorization": "Bearer root-key"}
AUTH = {
    "api_keys": [{"key": "capped-key", "name": "capped", "max_queued": 10}, {"key": "keyed-key", "name": "keyed"}],
    "admin_keys": [{"key": "root-key", "name": "root"}],
}


def settings(**model: Any) -> dict[str, Any]:
    # 0.05 s a step at 64x64, 200 steps: a job that runs stays unfinished for the test
    return {**stub_settings(simulate_step_seconds=12.0, **model), "auth": AUTH}


@pytest.fixture(scope="module")
def api_nodes(tmp_path_factory: pytest.TempPathFactory, shared_redis: RedisServer) -> Iterator[list[RunningServer]]:
    """Two API nodes (no worker: their jobs stay queued) on one redis-server."""
    cfg = {**settings(), "broker": {"prefix": f"adm{free_port()}:"}}
    cluster = Cluster(tmp_path_factory.mktemp("admission"), shared_redis, cfg)
    try:
        yield [cluster.api(), cluster.api()]
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def memory_node(server_factory: Callable[..., RunningServer]) -> RunningServer:
    return server_factory(settings())


def burst(nodes: list[RunningServer], count: int, headers: dict[str, str], body: dict[str, Any]) -> list[httpx.Response]:
    """``count`` submissions at once, spread over ``nodes`` in turn."""

    async def send() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(
                client.post(f"{nodes[i % len(nodes)].url}/api/generate", json=body, headers=headers) for i in range(count)
            ))  # fmt: skip

    return asyncio.run(send())


def queued_ids(node: RunningServer, headers: dict[str, str], *statuses: str) -> list[str]:
    listed = node.client.get("/api/tasks", params={"limit": 1000}, headers=headers).json()
    return [j["task_id"] for j in listed["queue"] if j["status"] in (statuses or ("waiting", "running"))]


def check_max_queued(nodes: list[RunningServer]) -> None:
    answers = burst(nodes, 40, CAPPED, {"prompt": "a red fox", "steps": 200})
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 10 + [429] * 30, [r.text for r in answers if r.status_code not in (200, 429)]
    for r in answers:
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["code"] == "quota_exceeded" and "max_queued" in error["message"], error
            assert int(r.headers["Retry-After"]) >= 1
    accepted = {r.json()["task_id"] for r in answers if r.status_code == 200}
    assert set(queued_ids(nodes[0], CAPPED)) == accepted
    # a waiting job cancelled on one node frees its place for a submission on the other, one place only
    victim = queued_ids(nodes[0], CAPPED, "waiting")[-1]
    assert nodes[-1].client.get("/api/cancel", params={"task_id": victim}, headers=CAPPED).json()["status"] == "cancelled"
    again = burst(nodes, 4, CAPPED, {"prompt": "a red fox", "steps": 200})
    assert sorted(r.status_code for r in again) == [200, 429, 429, 429]
    for task_id in accepted | {r.json()["task_id"] for r in again if r.status_code == 200}:
        nodes[0].client.get("/api/cancel", params={"task_id": task_id}, headers=ROOT)


def check_one_job_per_idempotency_key(nodes: list[RunningServer]) -> None:
    tag = uuid.uuid4().hex
    answers = burst(nodes, 20, {**KEYED, "Idempotency-Key": tag}, {"prompt": "a red fox", "steps": 200, "metadata": {"tag": tag}})
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    assert len({r.json()["task_id"] for r in answers}) == 1
    listed = nodes[0].client.get("/api/tasks", params={"limit": 1000}, headers=KEYED).json()
    mine = [j for j in listed["queue"] + listed["recent"] if (j.get("metadata") or {}).get("tag") == tag]
    assert len(mine) == 1, mine
    nodes[0].client.get("/api/cancel", params={"task_id": mine[0]["task_id"]}, headers=ROOT)


def test_two_api_nodes_let_exactly_max_queued_of_40_concurrent_submissions_through(api_nodes: list[RunningServer]) -> None:
    check_max_queued(api_nodes)


def test_one_idempotency_key_sent_to_two_api_nodes_at_once_makes_one_job(api_nodes: list[RunningServer]) -> None:
    check_one_job_per_idempotency_key(api_nodes)


def test_the_memory_broker_lets_exactly_max_queued_of_40_concurrent_submissions_through(memory_node: RunningServer) -> None:
    check_max_queued([memory_node])


def test_the_memory_broker_makes_one_job_per_idempotency_key_under_concurrent_requests(memory_node: RunningServer) -> None:
    check_one_job_per_idempotency_key([memory_node])


def test_a_key_without_a_quota_is_not_counted(memory_node: RunningServer) -> None:
    answers = burst([memory_node], 12, KEYED, {"prompt": "a red fox", "steps": 200})
    assert {r.status_code for r in answers} == {200}
    for r in answers:
        memory_node.client.get("/api/cancel", params={"task_id": r.json()["task_id"]}, headers=ROOT)
