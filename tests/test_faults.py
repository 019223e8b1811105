"""Fault injection on the Redis broker, Jepsen-style on one machine: real
``redis-server`` processes and real easel processes (API nodes, workers) on
loopback, a worker or Redis paused with SIGSTOP past a deadline, Redis killed and
restarted from its append-only file, a webhook receiver on loopback.

Each test is one failure that fault injection found (the numbers are those of the
issue that reported them): it failed before the fix and passes after.  Leases
are short (2 s) and ``broker.timeout_seconds`` is 1 s, so each fault shows within
seconds."""

from __future__ import annotations

import json
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

from .cluster import Cluster
from .loopback_http import LoopbackServer, Reply
from .redis_fixtures import RedisServer, redis_server_fresh  # noqa: F401 - a fixture
from .servers import RunningServer, start_server, stub_settings

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


class FaultCluster(Cluster):
    """A ``Cluster`` that can look into Redis and pause it; killed at the end of the test."""

    def start(self, role: str, cfg: dict[str, Any] | None = None) -> RunningServer:
        node = super().start(role, cfg)
        node.client.timeout = httpx.Timeout(15)
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
        super().stop()
        if self.redis.proc is not None:
            os.kill(self.redis.proc.pid, signal.SIGCONT)


@pytest.fixture
def cluster(tmp_path: Path, redis_server_fresh: RedisServer) -> Iterator[FaultCluster]:  # noqa: F811
    c = FaultCluster(tmp_path, redis_server_fresh)
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


def test_1_a_submit_refused_while_redis_stalls_never_makes_a_job(cluster: FaultCluster) -> None:
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
    from server.items import Item
    from server.jobs import JobRecord

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


def test_2_an_idempotent_retry_after_a_refused_submit_gets_a_clean_submit_at_once(cluster: FaultCluster) -> None:
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


def test_6_every_api_call_fails_fast_with_retry_after_while_redis_stalls(cluster: FaultCluster) -> None:
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
    from server.items import Item
    from server.jobs import JobRecord, JobStatus, preview_key, result_key

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


# ----- 4, 5: webhooks for every final state, retried through outages ---------------------------


def hooked(node: RunningServer, receiver: LoopbackServer, path: str, **body: Any) -> str:
    r = node.client.post("/api/generate", json={"prompt": "a fox", "webhook_url": receiver.url(path), **body})
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


def payloads(receiver: LoopbackServer, path: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
    calls = receiver.wait_count(path, count, timeout)
    return [{**json.loads(c.body), "webhook-id": c.headers.get("webhook-id")} for c in calls]


def wait_running(node: RunningServer, task_id: str, attempt: int = 1, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = status(node, task_id, wait=0.5).json()
        if body["status"] == "running" and body["attempt"] == attempt:
            return body
        assert time.monotonic() < deadline and body["status"] in ("waiting", "running"), body


def delivered(body: dict[str, Any]) -> bool:
    return body["webhook"] != "pending"


def test_4_every_final_state_gets_its_webhook_on_redis(cluster: FaultCluster) -> None:
    """Done, cancelled while waiting, cancelled while running, and error (its workers
    lost twice, ended by the reaper on an API node): one webhook each, for that state,
    and the record says ``ok``; a long-poll on a delivered job answers at once."""
    with LoopbackServer() as receiver:
        cfg = settings(receiver, simulate_step_seconds=20.0, recommended_steps=4)
        api = cluster.start("api", cfg)
        waiting = hooked(api, receiver, "/waiting")
        assert api.client.post("/api/cancel", params={"task_id": waiting}).status_code == 200
        assert [p["status"] for p in payloads(receiver, "/waiting")] == ["cancelled"]
        assert final(api, waiting, delivered)["webhook"] == "ok"
        t0 = time.monotonic()
        assert status(api, waiting, wait=5).status_code == 200 and time.monotonic() - t0 < 2  # no full wait

        workers = [cluster.start("worker", cfg) for _ in range(2)]
        done = hooked(api, receiver, "/done")
        assert [p["status"] for p in payloads(receiver, "/done")] == ["done"]
        assert final(api, done, delivered)["webhook"] == "ok"

        running = hooked(api, receiver, "/running", prompt="hang 30")
        wait_running(api, running)
        assert api.client.post("/api/cancel", params={"task_id": running}).status_code == 200
        assert [p["status"] for p in payloads(receiver, "/running")] == ["cancelled"]

        lost = hooked(api, receiver, "/lost", prompt="hang 30")
        for attempt in (1, 2):  # whichever worker runs it dies, twice
            st = wait_running(api, lost, attempt)
            victim = next(w for w in workers if f":{w.proc.pid}:" in st["worker"])
            victim.stop(signal.SIGKILL)
            workers.remove(victim)
        [p] = payloads(receiver, "/lost")
        assert p["status"] == "error" and "lost twice" in p["message"], p
        assert final(api, lost, delivered)["webhook"] == "ok"
        ids = [r.headers.get("webhook-id") for r in receiver.requests]
        assert len(ids) == len(set(ids)) == 4  # one per job outcome, each sent once here


def test_4_cancelled_jobs_get_their_webhook_on_the_memory_broker(tmp_path: Path) -> None:
    with LoopbackServer() as receiver:
        cfg = settings(receiver, simulate_step_seconds=20.0, recommended_steps=4)
        del cfg["broker"]
        node = start_server(tmp_path, cfg)
        try:
            running = hooked(node, receiver, "/running", prompt="hang 30")
            wait_running(node, running)
            waiting = hooked(node, receiver, "/waiting")
            assert node.client.post("/api/cancel", params={"task_id": waiting}).status_code == 200
            assert node.client.post("/api/cancel", params={"task_id": running}).status_code == 200
            for path, task_id in (("/waiting", waiting), ("/running", running)):
                [p] = payloads(receiver, path)
                assert p["status"] == "cancelled" and p["task_id"] == task_id and p["webhook-id"] == f"msg_{task_id}"
                assert final(node, task_id, delivered)["webhook"] == "ok"
        finally:
            node.stop(signal.SIGKILL)


def test_5_a_webhook_is_retried_when_the_receiver_is_down_and_across_a_redis_crash(cluster: FaultCluster) -> None:
    """The receiver fails the first POST: it is tried again a second later, from the
    outbox.  Then Redis is killed (SIGKILL) while a second POST is in flight: the
    receiver gets it (200), the outcome is recorded once Redis is back (restarted from
    its append-only file), and the record reads ``ok``: never ``pending`` forever."""
    with LoopbackServer([Reply(503), Reply(200), Reply(200, delay=1.5)]) as receiver:
        cfg = settings(receiver)
        api = cluster.start("api", cfg)
        cluster.start("worker", cfg)
        first = hooked(api, receiver, "/first")
        calls = payloads(receiver, "/first", 2)
        assert [c["status"] for c in calls] == ["done", "done"]
        assert {c["webhook-id"] for c in calls} == {f"msg_{first}"}
        assert final(api, first, delivered)["webhook"] == "ok"

        second = hooked(api, receiver, "/second")  # its POST is answered after 1.5 s
        receiver.wait_for("/second")
        assert cluster.redis.proc is not None
        os.kill(cluster.redis.proc.pid, signal.SIGKILL)  # the POST's answer comes while Redis is dead
        cluster.redis.proc.wait()
        cluster.redis.proc = None
        time.sleep(2.0)  # Redis stays down past the answer: the outcome cannot be recorded yet
        cluster.redis.start()
        body = final(api, second, delivered, timeout=40)
        assert body["status"] == "done" and body["webhook"] == "ok"
        assert {c["webhook-id"] for c in payloads(receiver, "/second")} == {f"msg_{second}"}
