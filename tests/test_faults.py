"""Fault injection on the Redis broker, Jepsen-style on one machine: real
``redis-server`` processes and real easel processes (API nodes, workers) on
loopback, a worker or Redis paused with SIGSTOP past a deadline, Redis killed and
restarted from its append-only file, a webhook receiver on loopback.

Each test is one failure that fault injection found (the numbers are those of the
issue that reported them): it failed before the fix and passes after.  Leases
are short (2 s) and ``broker.timeout_seconds`` is 1 s, so each fault shows within
seconds."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from .conftest import RunningServer, start_server, stub_settings
from .loopback_http import LoopbackServer
from .redis_fixtures import RedisServer, redis_server_fresh  # noqa: F401 - a fixture

TIMEOUT = 1.0  # broker.timeout_seconds of every node here


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(hooks: LoopbackServer | None = None, **model: Any) -> dict[str, Any]:
    out = stub_settings(**model)
    out["broker"] = {"lease_seconds": 2.0, "heartbeat_seconds": 0.25, "timeout_seconds": TIMEOUT}
    out["queue"] = {"shutdown_grace_seconds": 1}
    if hooks is not None:
        out["delivery"] = {"allowed_hosts": [hooks.host_port], "retries": 0, "backoff_seconds": 0.05}
    return out


class Cluster:
    """Nodes of one easel on one Redis, killed at the end of the test."""

    def __init__(self, tmp: Path, redis_server: RedisServer) -> None:
        self.tmp = tmp
        self.redis = redis_server
        self.nodes: list[RunningServer] = []

    def start(self, role: str, cfg: dict[str, Any]) -> RunningServer:
        node = start_server(self.tmp, cfg, ("--broker", self.redis.url, "--role", role))
        node.client.timeout = httpx.Timeout(15)
        self.nodes.append(node)
        return node

    def db(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, socket_timeout=5)

    def job_ids(self) -> set[str]:
        """Every job record in Redis."""
        with self.db() as r:
            return {k.decode().rsplit(":", 1)[1] for k in r.scan_iter("easel:job:*")}

    @contextmanager
    def redis_paused(self) -> Iterator[None]:
        """Redis stopped (SIGSTOP) for the block: connections open, nothing answered."""
        assert self.redis.proc is not None
        os.kill(self.redis.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.redis.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(signal.SIGKILL)
        if self.redis.proc is not None:
            os.kill(self.redis.proc.pid, signal.SIGCONT)


@pytest.fixture
def cluster(tmp_path: Path, redis_server_fresh: RedisServer) -> Iterator[Cluster]:  # noqa: F811
    c = Cluster(tmp_path, redis_server_fresh)
    try:
        yield c
    finally:
        c.stop()


def status(node: RunningServer, task_id: str, **params: Any) -> httpx.Response:
    return node.client.get("/api/status", params={"task_id": task_id, **params})


def final(node: RunningServer, task_id: str, settled: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 30) -> dict[str, Any]:
    """Long-poll until the job is final (and ``settled`` holds)."""
    deadline = time.monotonic() + timeout
    while True:
        r = status(node, task_id, wait=0.5)
        if r.status_code == 200:
            body: dict[str, Any] = r.json()
            if body["status"] in ("done", "error", "cancelled") and (settled is None or settled(body)):
                return body
        assert time.monotonic() < deadline, r.text


# ----- 1, 2, 6: submits while Redis stalls ----------------------------------------------------


def test_1_a_submit_refused_while_redis_stalls_never_makes_a_job(cluster: Cluster) -> None:
    """Redis paused: the submit answers 503 within about the broker timeout, with
    Retry-After and the task id; once Redis answers again that id is unknown and no
    job was queued, nor does one run later."""
    api = cluster.start("api", settings())
    worker = cluster.start("worker", settings())
    warm = api.client.post("/api/generate", json={"prompt": "a fox"})  # the forecast read, cached for 0.5 s
    assert warm.status_code == 200, warm.text
    with cluster.redis_paused():  # so this submit stalls at its queueing script (most runs)
        t0 = time.monotonic()
        r = api.client.post("/api/generate", json={"prompt": "a fox"})
        took = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert took < TIMEOUT * 3, took  # fails fast: no 10 s hang
    assert int(r.headers["Retry-After"]) >= 1
    task_id = r.json()["error"].get("task_id")  # absent when an earlier read stalled: nothing was sent
    time.sleep(TIMEOUT)  # time for the stalled script to reach Redis: were it to run, it would have by now
    if task_id is not None:
        assert status(api, task_id).status_code == 404
    assert final(api, warm.json()["task_id"])["status"] == "done"
    assert cluster.job_ids() == {warm.json()["task_id"]}  # the refused one never came to be
    # the cluster is well again: a new submit runs
    ok = api.client.post("/api/generate", json={"prompt": "a fox"})
    assert ok.status_code == 200, ok.text
    assert final(api, ok.json()["task_id"])["status"] == "done"
    assert cluster.job_ids() == {warm.json()["task_id"], ok.json()["task_id"]}
    assert task_id is None or f"job {task_id}" not in worker.log()


@pytest.mark.anyio
async def test_1_a_submit_script_that_reaches_redis_after_its_caller_gave_up_queues_nothing(
    redis_server_fresh: RedisServer,  # noqa: F811
) -> None:
    """The broker-level half, deterministic: the script stalls in a paused Redis past
    the call's timeout, runs when Redis resumes, and refuses (``SubmitUnknown``)."""
    from server.broker.base import SubmitKey, SubmitUnknown
    from server.broker.redis import RedisBroker
    from server.jobs import Item, JobRecord

    broker = RedisBroker(redis_server_fresh.url, result_ttl=60, timeout=0.5)
    await broker.start()
    try:
        job = JobRecord(model="m", task="generate", items=[Item(prompt="p", width=64, height=64, steps=2, seed=0)], features=[1.0])
        assert redis_server_fresh.proc is not None
        os.kill(redis_server_fresh.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(SubmitUnknown) as info:
                await broker.submit(job, {"in:x": b"bytes"}, capacity=10, idempotency=SubmitKey("k", "fp", 60))
        finally:
            os.kill(redis_server_fresh.proc.pid, signal.SIGCONT)
        assert info.value.task_id == job.id
        assert await broker.get(job.id) is None  # answered after the script ran: it refused
        assert await broker.get_blob("in:x") is None
        assert await broker.submitted("k") is None
        assert await broker.depth("m") == (0, 0)
    finally:
        await broker.close()


def test_2_an_idempotent_retry_after_a_refused_submit_gets_a_clean_submit_at_once(cluster: Cluster) -> None:
    api = cluster.start("api", settings())
    cluster.start("worker", settings())
    key = {"Idempotency-Key": uuid.uuid4().hex}
    with cluster.redis_paused():
        r = api.client.post("/api/generate", json={"prompt": "a fox"}, headers=key)
    assert r.status_code == 503, r.text
    refused = r.json()["error"].get("task_id")
    t0 = time.monotonic()
    retry = api.client.post("/api/generate", json={"prompt": "a fox"}, headers=key)
    assert retry.status_code == 200, retry.text
    assert time.monotonic() - t0 < 1.0
    task_id = retry.json()["task_id"]
    assert task_id != refused
    again = api.client.post("/api/generate", json={"prompt": "a fox"}, headers=key)  # the key now names that job
    assert again.status_code == 200 and again.json()["task_id"] == task_id, again.text
    assert final(api, task_id)["status"] == "done"
    assert cluster.job_ids() == {task_id}


def test_6_every_api_call_fails_fast_with_retry_after_while_redis_stalls(cluster: Cluster) -> None:
    api = cluster.start("api", settings())
    r = api.client.post("/api/generate", json={"prompt": "a fox"})
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    with cluster.redis_paused():
        for call in (lambda: status(api, task_id), lambda: api.client.get("/api/tasks"), lambda: api.client.post("/api/cancel", params={"task_id": task_id})):
            t0 = time.monotonic()
            res = call()
            assert res.status_code == 503, res.text
            assert time.monotonic() - t0 < TIMEOUT * 3
            assert int(res.headers["Retry-After"]) >= 1


# ----- 3: fenced image writes ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_3_a_fenced_attempts_images_and_previews_never_become_the_jobs(
    redis_server_fresh: RedisServer,  # noqa: F811
) -> None:
    """Attempt 1 loses its lease (reaped), attempt 2 finishes with its image; attempt 1's
    late finish and late preview are refused and store nothing: the job's image is
    attempt 2's, and attempt 1's previews went when it was reaped."""
    from server.broker.redis import RedisBroker
    from server.jobs import Item, JobRecord, JobStatus, preview_key, result_key

    a = RedisBroker(redis_server_fresh.url, result_ttl=60, timeout=2)
    b = RedisBroker(redis_server_fresh.url, result_ttl=60, timeout=2)
    await a.start()
    await b.start()
    try:
        job = JobRecord(model="m", task="generate", items=[Item(prompt="p", width=64, height=64, steps=2, seed=0)], features=[1.0])
        await a.submit(job, {}, capacity=10)
        first = await a.claim("m", "worker-a", lease=0.05, timeout=1)
        assert first is not None and first.attempt == 1
        assert await a.put_attempt_blob(job.id, 1, preview_key(job.id, 0), b"preview of attempt 1")
        await a.update(first, {"previews": 1}, attempt=1)
        deadline = time.monotonic() + 5
        while (await b.get(job.id)).status is not JobStatus.WAITING:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            await b.reap()  # the lease runs out on Redis's clock
        assert await b.get_blob(preview_key(job.id, 0)) is None  # the lost attempt's preview went
        second = await b.claim("m", "worker-b", lease=30, timeout=1)
        assert second is not None and second.attempt == 2
        assert await b.finish(second, JobStatus.DONE, {}, attempt=2, blobs={result_key(job.id, 0): b"image of attempt 2"})
        # attempt 1 wakes up late
        assert not await a.put_attempt_blob(job.id, 1, preview_key(job.id, 1), b"late preview")
        assert not await a.finish(first, JobStatus.DONE, {}, attempt=1, blobs={result_key(job.id, 0): b"image of attempt 1"})
        assert await b.get_blob(result_key(job.id, 0)) == b"image of attempt 2"
        assert await b.get_blob(preview_key(job.id, 1)) is None
    finally:
        await a.close()
        await b.close()
