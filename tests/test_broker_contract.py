"""One contract over both brokers (memory and Redis), then what only Redis has:
leases and the reaper, durability across a restart, an unreachable Redis, and
events between two nodes on one Redis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from server.broker.base import Admission, Broker, BrokerUnavailable, QueueFullError, QuotaRefused, SubmitKey, WorkerInfo
from server.features import DECAYED, DIM, STATS, WIDTH, apply, job_vector
from server.forecast import call_features, observation
from server.items import Item
from server.jobs import JobRecord, JobStatus, input_key, preview_key, result_key
from server.queue import STRIDE

from .redis_fixtures import RedisServer, redis_flushed, redis_server, redis_server_fresh, redis_url  # noqa: F401

pytestmark = pytest.mark.anyio
TTL = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def memory_broker() -> Broker:
    from server.broker.memory import MemoryBroker

    return MemoryBroker(result_ttl=TTL, result_memory_bytes=64 << 20)


def redis_broker(url: str, **kw: Any) -> Broker:
    from server.broker.redis import RedisBroker

    return RedisBroker(url, result_ttl=kw.pop("result_ttl", TTL), **kw)


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Broker]:
    if request.param == "memory":
        try:
            b = memory_broker()
        except ImportError:
            pytest.skip("server.broker.memory is not there yet")
    else:
        server: RedisServer = request.getfixturevalue("redis_flushed")
        b = redis_broker(server.url)
    await b.start()
    try:
        yield b
    finally:
        await b.close()


def make_job(priority: int = 0, steps: int = 4, model: str = "m", task: str = "generate", **kw: Any) -> JobRecord:
    item = Item(prompt="p", width=64, height=64, steps=steps, seed=0)
    feats = call_features(task, steps, item.megapixels, 1, [0.004] if task == "edit" else [])
    return JobRecord(model=model, task=task, items=[item], priority=priority, features=feats.tolist(), **kw)


def vector(job: JobRecord) -> np.ndarray:
    return job_vector(job.task, np.asarray(job.features))


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# ----- queue ---------------------------------------------------------------------------


async def test_claim_order_is_priority_then_arrival(broker: Broker) -> None:
    jobs = [make_job(p) for p in [0, 0, -1, 5, -1, 0]]
    for j in jobs:
        await broker.submit(j, {}, capacity=100)
    assert [j.seq for j in jobs] == sorted(j.seq for j in jobs) and len({j.seq for j in jobs}) == len(jobs)
    assert all(j.created_at > 0 for j in jobs)
    expected = [j.id for j in sorted(jobs, key=lambda j: (j.priority, j.seq))]
    assert [j.id for j in await broker.waiting("m", 100)] == expected
    assert [j.id for j in await broker.waiting("m", 2)] == expected[:2]
    claimed = []
    for _ in jobs:
        got = await broker.claim("m", "w1", lease=30, timeout=0)
        assert got is not None
        assert got.status is JobStatus.RUNNING and got.worker == "w1" and got.attempt == 1
        assert got.started_at is not None
        claimed.append(got.id)
    assert claimed == expected
    assert await broker.claim("m", "w1", lease=30, timeout=0.2) is None
    assert await broker.depth("m") == (0, len(jobs))
    assert sorted(j.id for j in await broker.running("m")) == sorted(expected)


async def test_claim_waits_for_a_submit(broker: Broker) -> None:
    waiter = asyncio.create_task(broker.claim("m", "w1", lease=30, timeout=5))
    await asyncio.sleep(0.1)
    job = make_job()
    await broker.submit(job, {}, capacity=10)
    got = await asyncio.wait_for(waiter, 5)
    assert got is not None and got.id == job.id


async def submits_seen(broker: Broker, model: str, count: int) -> None:
    """Until ``count`` submits of ``model`` reached this process (Redis: through its events stream)."""
    while (seen := broker.submits(model)) < count:
        assert await broker.wait_submitted(model, 5, seen), f"{seen} of {count} submits seen"


async def test_a_claim_says_whether_it_left_the_queue_empty(broker: Broker) -> None:
    first, second = make_job(), make_job()
    for job in (first, second):
        await broker.submit(job, {}, capacity=10)
    await submits_seen(broker, "m", 2)
    assert not broker.emptied("m")  # nothing claimed yet
    assert await broker.claim("m", "w", lease=30, timeout=0) is not None
    assert not broker.emptied("m")  # one job left
    assert await broker.claim("m", "w", lease=30, timeout=0) is not None
    assert broker.emptied("m")
    await broker.submit(make_job(), {}, capacity=10)
    await submits_seen(broker, "m", 3)
    assert not broker.emptied("m")  # a job came since
    assert await broker.claim("m", "w", lease=30, timeout=0) is not None
    assert broker.emptied("m") and not broker.emptied("other")


async def test_positions_and_sums_ahead_match_a_brute_force_count(broker: Broker) -> None:
    rng = random.Random(7)
    live: list[JobRecord] = []
    order: dict[str, tuple[int, int]] = {}  # job id -> run order: (priority, seq), a re-run below every seq
    heads = 0
    for step in range(300):
        op = rng.random()
        if op < 0.5 or not live:
            j = make_job(rng.choice([-1, 0, 0, 0, 3]), steps=rng.randint(1, 30), task=rng.choice(["generate", "edit"]))
            await broker.submit(j, {}, capacity=100_000)
            live.append(j)
            order[j.id] = (j.priority, j.seq)
        elif op < 0.7:
            j = live.pop(rng.randrange(len(live)))
            rec = await broker.cancel(j.id, "gone")
            assert rec is not None and rec.status is JobStatus.CANCELLED
        else:
            got = await broker.claim("m", "w", lease=30, timeout=0)
            assert got is not None
            head = min(live, key=lambda x: order[x.id])
            assert got.id == head.id
            if op < 0.8:  # released: back at the head of its priority
                assert await broker.release(got, got.attempt)
                heads += 1
                order[got.id] = (got.priority, -heads)
            else:
                live.remove(head)
        if live and (rng.random() < 0.3 or step % 50 == 0):
            probe = rng.choice(live)
            ahead = [x for x in live if order[x.id] < order[probe.id]]
            st = await broker.standing(probe, "m")
            assert st.ahead.shape == (WIDTH,)
            assert int(round(st.ahead[DIM])) == len(ahead)
            np.testing.assert_allclose(st.ahead, sum((vector(x) for x in ahead), np.zeros(WIDTH)), atol=1e-6)
        if rng.random() < 0.1:
            st = await broker.standing(None, "m")
            np.testing.assert_allclose(st.ahead, sum((vector(x) for x in live), np.zeros(WIDTH)), atol=1e-6)
    assert (await broker.depth("m"))[0] == len(live)
    expected = [x.id for x in sorted(live, key=lambda x: order[x.id])]
    assert [x.id for x in await broker.waiting("m", 100_000)] == expected


class FairShare:
    """server/queue.py's rule, brute force: every lane a list, the run order a sort of
    every waiting job by (priority, its lane's turn for it, when its lane opened)."""

    def __init__(self) -> None:
        self.levels: dict[int, dict[str, Any]] = {}

    def _level(self, priority: int) -> dict[str, Any]:
        return self.levels.setdefault(priority, {"clock": 0, "opened": 0, "lanes": {}})

    def push(self, job: JobRecord, front: bool = False) -> None:
        level = self._level(job.priority)
        lane = level["lanes"].get(job.share)
        if lane is None:
            lane = level["lanes"][job.share] = {"base": level["clock"], "stride": STRIDE // job.weight, "since": level["opened"], "jobs": []}
            level["opened"] += 1
        lane["jobs"].insert(0, job.id) if front else lane["jobs"].append(job.id)

    def first(self, job: JobRecord) -> None:
        level = self.levels[job.priority]
        own = level["lanes"][job.share]
        others = [ln["base"] + ln["stride"] for s, ln in level["lanes"].items() if s != job.share]
        if others:
            own["base"] = min(own["base"], min(others) - 1 - own["stride"])

    def move(self, job: JobRecord, front: bool, first: bool) -> None:
        lane = self.levels[job.priority]["lanes"][job.share]
        lane["jobs"].remove(job.id)
        lane["jobs"].insert(0, job.id) if front or first else lane["jobs"].append(job.id)
        if first:
            self.first(job)

    def remove(self, job: JobRecord, charge: bool = False) -> None:
        level = self.levels[job.priority]
        lane = level["lanes"][job.share]
        if charge:
            if self.head_of(job.priority) == job.id:
                level["clock"] = lane["base"] + lane["stride"]
            lane["base"] += lane["stride"]
        lane["jobs"].remove(job.id)
        if not lane["jobs"]:
            del level["lanes"][job.share]
        if not level["lanes"]:
            del self.levels[job.priority]

    def keys(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        for priority, level in self.levels.items():
            for lane in level["lanes"].values():
                for n, job_id in enumerate(lane["jobs"], 1):
                    out[job_id] = (priority, lane["base"] + n * lane["stride"], lane["since"])
        return out

    def head_of(self, priority: int) -> str:
        keys = self.keys()
        return min((k for k in keys if keys[k][0] == priority), key=lambda k: keys[k])

    def order(self) -> list[str]:
        keys = self.keys()
        return sorted(keys, key=lambda k: keys[k])


async def test_fair_share_positions_and_sums_match_a_brute_force_simulation(broker: Broker) -> None:
    rng = random.Random(11)
    sim = FairShare()
    live: dict[str, JobRecord] = {}
    weights = {"a": 1, "b": 3, "c": 2, "-": 1}
    for step in range(400):
        op = rng.random()
        if op < 0.45 or not live:
            share = rng.choice(["a", "a", "a", "b", "c", "-"])
            j = make_job(rng.choice([-1, 0, 0, 0, 0, 3]), steps=rng.randint(1, 30), task=rng.choice(["generate", "edit"]),
                         share=share, weight=weights[share])  # fmt: skip
            await broker.submit(j, {}, capacity=100_000)
            live[j.id] = j
            sim.push(j)
        elif op < 0.55:
            j = live.pop(rng.choice(sorted(live)))
            rec = await broker.cancel(j.id, "gone")
            assert rec is not None and rec.status is JobStatus.CANCELLED
            sim.remove(j)
        elif op < 0.65:
            j = live[rng.choice(sorted(live))]
            front, first = rng.random() < 0.5, rng.random() < 0.3
            assert await broker.move(j.id, front, first)
            sim.move(j, front, first)
        else:
            got = await broker.claim("m", "w", lease=30, timeout=0)
            assert got is not None
            assert got.id == sim.order()[0], step
            sim.remove(live[got.id], charge=True)
            if op < 0.75:  # released: first of its priority, its lane's turn next
                assert await broker.release(got, got.attempt)
                sim.push(live[got.id], front=True)
                sim.first(live[got.id])
            else:
                del live[got.id]
                await broker.finish(got, JobStatus.DONE, {}, attempt=got.attempt, blobs={})
        order = sim.order()
        if live and (rng.random() < 0.3 or step % 50 == 0):
            probe = live[rng.choice(sorted(live))]
            ahead = [live[i] for i in order[: order.index(probe.id)]]
            st = await broker.standing(probe, "m")
            assert int(round(st.ahead[DIM])) == len(ahead), step
            np.testing.assert_allclose(st.ahead, sum((vector(x) for x in ahead), np.zeros(WIDTH)), atol=1e-6)
        if rng.random() < 0.1:
            assert [x.id for x in await broker.waiting("m", 100_000)] == order
    assert [x.id for x in await broker.waiting("m", 100_000)] == sim.order()
    assert [x.id for x in await broker.waiting("m", 7)] == sim.order()[:7]


async def test_two_keys_take_turns_and_weights_set_the_share(broker: Broker) -> None:
    for _ in range(30):
        await broker.submit(make_job(share="a"), {}, capacity=1000)
    first = await broker.claim("m", "w", lease=30, timeout=0)  # a's first runs
    late = make_job(share="b")
    await broker.submit(late, {}, capacity=1000)
    st = await broker.standing(late, "m")
    assert int(st.ahead[DIM]) == 1  # one more of a's, then b's
    ids = [j.id for j in await broker.waiting("m", 3)]
    assert ids[1] == late.id and first is not None
    heavy = [make_job(priority=1, share="h", weight=3) for _ in range(30)]
    light = [make_job(priority=1, share="l", weight=1) for _ in range(10)]
    for j in [*heavy, *light]:
        await broker.submit(j, {}, capacity=1000)
    order = [j.share for j in await broker.waiting("m", 100) if j.priority == 1]
    assert order == ["h", "h", "h", "l"] * 10


async def test_jobs_left_waiting_in_the_layout_before_fair_share_join_their_lanes(
    redis_flushed: RedisServer, anyio_backend: str,  # noqa: F811
) -> None:
    """A Redis written by a version before fair share: its waiting jobs sit in ``q:{m}``
    and the per-level sums, in no lane, and their records name no share.  A node of
    this version moves them into lanes when it starts: they run in their old order."""
    old = redis_broker(redis_flushed.url)
    await old.start()
    jobs = [make_job(p) for p in [0, 1, 0, 0, 1]]
    for j in jobs:
        await old.submit(j, {}, capacity=100)
    r, prefix = old._redis, old.prefix  # type: ignore[attr-defined]
    for pattern in ("ln:*", "rr:*", "fen:*", "pop:*"):  # the lanes did not exist
        for key in [k async for k in r.scan_iter(match=prefix + pattern)]:
            await r.delete(key)
    await r.delete(prefix + "seq:m")
    for j in jobs:
        await r.hdel(f"{prefix}job:{j.id}", "share", "weight")
    level_sums = f"{prefix}fen:m:{2**20}"  # one of the old layout's per-level trees
    await r.hset(level_sums, mapping={"t:45": 3})
    assert await old.claim("m", "w", lease=30, timeout=0) is None  # stranded: no lane holds them
    await old.close()
    new = redis_broker(redis_flushed.url)
    await new.start()
    try:
        expected = [j.id for j in sorted(jobs, key=lambda j: (j.priority, j.seq))]
        assert [j.id for j in await new.waiting("m", 100)] == expected
        for n, job_id in enumerate(expected):
            stored = await new.get(job_id)
            assert stored is not None and int((await new.standing(stored, "m")).ahead[DIM]) == n
        assert not await r.exists(level_sums)
        claimed = [(await new.claim("m", "w", lease=30, timeout=0)) for _ in expected]
        assert [c.id for c in claimed if c is not None] == expected
    finally:
        await new.close()


async def test_a_move_reorders_a_key_s_own_jobs_or_puts_a_job_first(broker: Broker) -> None:
    a = [make_job(share="a") for _ in range(3)]
    b = [make_job(share="b") for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        await broker.submit(x, {}, capacity=100)
        await broker.submit(y, {}, capacity=100)

    async def pos(job: JobRecord) -> int:
        return int((await broker.standing(job, "m")).ahead[DIM])

    assert [await pos(j) for j in a] == [0, 2, 4]
    assert await broker.move(a[2].id, True)  # the front of a's own jobs: a's first turn
    assert [await pos(j) for j in (a[2], a[0], a[1])] == [0, 2, 4]
    assert await broker.move(a[2].id, False)  # back again
    assert [await pos(j) for j in a] == [0, 2, 4]
    assert await broker.move(b[2].id, True, True)  # first of the priority
    assert await pos(b[2]) == 0 and await pos(a[0]) == 1
    claimed = await broker.claim("m", "w", lease=30, timeout=0)
    assert claimed is not None and claimed.id == b[2].id
    assert not await broker.move(b[2].id, True)  # running: not moved
    assert not await broker.move("nope", True)


async def test_standing_counts_running_jobs(broker: Broker) -> None:
    a, b = make_job(), make_job()
    await broker.submit(a, {}, capacity=10)
    await broker.submit(b, {}, capacity=10)
    await broker.claim("m", "w", lease=30, timeout=0)
    st = await broker.standing(b, "m")
    assert [j.id for j in st.running] == [a.id]
    assert st.ahead[DIM] == 0
    empty = await broker.standing(None, "other")
    assert empty.running == [] and not empty.ahead.any()


async def test_a_job_not_queued_stands_behind_what_it_would_queue_behind_at_its_priority(broker: Broker) -> None:
    queued = [make_job(priority=p, steps=s) for p, s in [(0, 4), (-1, 8), (0, 2), (3, 16)]]
    for j in queued:
        await broker.submit(j, {}, capacity=10)
    for priority, behind in [(0, queued[:3]), (-1, queued[1:2]), (-5, []), (3, queued)]:
        st = await broker.standing(make_job(priority=priority), "m")
        assert int(st.ahead[DIM]) == len(behind), priority
        np.testing.assert_allclose(st.ahead, sum((vector(j) for j in behind), np.zeros(WIDTH)), atol=1e-9)


async def test_capacity_refuses_a_full_queue(broker: Broker) -> None:
    for _ in range(3):
        await broker.submit(make_job(), {}, capacity=3)
    with pytest.raises(QueueFullError) as info:
        await broker.submit(make_job(), {}, capacity=3)
    assert info.value.depth == 3
    await broker.submit(make_job(model="other"), {}, capacity=3)  # per model
    assert (await broker.depth("m"))[0] == 3


# ----- store ---------------------------------------------------------------------------


async def test_cancel_waiting_and_running(broker: Broker) -> None:
    asked: list[str] = []
    broker.on_cancel(asked.append)
    a, b = make_job(), make_job()
    await broker.submit(a, {}, capacity=10)
    await broker.submit(b, {}, capacity=10)
    running = await broker.claim("m", "w", lease=30, timeout=0)
    assert running is not None and running.id == a.id
    rec = await broker.cancel(b.id, "not wanted")
    assert rec is not None and rec.status is JobStatus.CANCELLED and rec.message == "not wanted"
    assert rec.finished_at is not None
    assert await broker.depth("m") == (0, 1)
    rec = await broker.cancel(a.id, "stop it")
    assert rec is not None and rec.status is JobStatus.RUNNING
    await eventually(lambda: a.id in asked)
    assert await broker.heartbeat([], [(a.id, running.attempt)], lease=30) == {a.id}
    assert await broker.cancel("nope", "x") is None
    assert b.id in [j.id for j in await broker.recent(10)]


async def test_update_is_fenced_by_attempt(broker: Broker) -> None:
    job = make_job()
    await broker.submit(job, {}, capacity=10)
    run = await broker.claim("m", "w", lease=30, timeout=0)
    assert run is not None and run.attempt == 1
    assert await broker.update(run, {"total_steps": 8, "extra": {"loss": 0.5}}, attempt=1)
    assert run.total_steps == 8
    stale = make_job()
    stale.id = job.id
    assert not await broker.update(stale, {"total_steps": 99}, attempt=0)
    assert stale.total_steps == 0
    got = await broker.get(job.id)
    assert got is not None and got.total_steps == 8 and got.extra == {"loss": 0.5}
    assert await broker.finish(run, JobStatus.DONE, {"worker_seconds": 1.5}, attempt=1, blobs={})
    assert not await broker.update(run, {"total_steps": 3}, attempt=1)  # finished
    assert await broker.update(run, {"webhook": "ok"})  # unfenced: deliveries after the end
    got = await broker.get(job.id)
    assert got is not None and got.webhook == "ok" and got.total_steps == 8 and got.worker_seconds == 1.5


async def test_finish_is_fenced_and_release_requeues_at_the_head(broker: Broker) -> None:
    a, b = make_job(), make_job()
    await broker.submit(a, {}, capacity=10)
    await broker.submit(b, {}, capacity=10)
    first = await broker.claim("m", "w", lease=30, timeout=0)
    assert first is not None and first.id == a.id
    assert await broker.put_attempt_blob(a.id, 1, preview_key(a.id, 0), b"partial")  # the attempt's preview
    assert await broker.update(first, {"step": 2, "previews": 1, "preview_seq": 3, "preview_step": 2}, attempt=1)
    assert await broker.release(first, 1)
    assert not await broker.release(first, 1)  # no longer running
    requeued = await broker.get(a.id)
    assert requeued is not None and requeued.status is JobStatus.WAITING and requeued.worker is None
    assert (requeued.step, requeued.previews, requeued.preview_seq, requeued.preview_step) == (0, 0, 0, 0)
    assert await broker.get_blob(preview_key(a.id, 0)) is None  # the lost attempt's previews go with it
    again = await broker.claim("m", "w2", lease=30, timeout=0)
    assert again is not None and again.id == a.id and again.attempt == 2 and again.lost == 0
    late = make_job()
    late.id = a.id
    assert not await broker.finish(late, JobStatus.DONE, {}, attempt=1, blobs={})
    assert await broker.finish(again, JobStatus.DONE, {}, attempt=2, blobs={})
    assert not await broker.finish(again, JobStatus.ERROR, {"message": "late"}, attempt=2, blobs={})
    got = await broker.get(a.id)
    assert got is not None and got.status is JobStatus.DONE and got.message is None and got.finished_at
    assert await broker.depth("m") == (1, 0)


async def test_blobs(broker: Broker) -> None:
    job = make_job()
    job.inputs = [input_key(job.id, "init")]
    await broker.submit(job, {input_key(job.id, "init"): b"input"}, capacity=10)
    assert await broker.get_blob(input_key(job.id, "init")) == b"input"
    run = await broker.claim("m", "w", lease=30, timeout=0)
    assert run is not None
    key = result_key(job.id, 0)
    assert await broker.finish(run, JobStatus.DONE, {}, attempt=run.attempt, blobs={key: b"\x89PNG bytes"})
    assert await broker.get_blob(key) == b"\x89PNG bytes"
    done = await broker.get(job.id)
    assert done is not None and done.message is None
    assert await broker.take_blob(key, done, {"message": "fetched"}) == b"\x89PNG bytes"  # once, the record marked with it
    stored = await broker.get(job.id)
    assert stored is not None and stored.message == done.message == "fetched"
    assert await broker.take_blob(key, done, {"message": "again"}) is None  # gone: the record is left alone
    stored = await broker.get(job.id)
    assert stored is not None and stored.message == done.message == "fetched"
    assert await broker.get_blob(key) is None
    await broker.put_blob("img:race:0", b"one")
    takers = await asyncio.gather(*(broker.take_blob("img:race:0") for _ in range(4)))
    assert sorted(takers, key=lambda t: t is None) == [b"one", None, None, None]  # two fetches with delete=true: one image
    await broker.put_blob("prev:x:0", b"partial")
    assert await broker.get_blob("prev:x:0") == b"partial"
    assert await broker.get_blob("img:none:0") is None


async def test_recent_and_jobs_of_task(broker: Broker) -> None:
    jobs = [make_job(), make_job(task="upscale"), make_job()]
    for j in jobs:
        await broker.submit(j, {}, capacity=10)
    for j in jobs:
        run = await broker.claim("m", "w", lease=30, timeout=0)
        assert run is not None and run.id == j.id
        assert await broker.finish(run, JobStatus.DONE, {}, attempt=run.attempt, blobs={})
        await asyncio.sleep(0.002)
    assert [j.id for j in await broker.recent(10)] == [j.id for j in reversed(jobs)]
    assert [j.id for j in await broker.recent(2)] == [jobs[2].id, jobs[1].id]
    extra = make_job()
    await broker.submit(extra, {}, capacity=10)
    assert [j.id for j in await broker.jobs_of_task("generate")] == [jobs[0].id, jobs[2].id, extra.id]
    assert [j.id for j in await broker.jobs_of_task("upscale")] == [jobs[1].id]
    assert await broker.jobs_of_task("train") == []


async def test_wait_change(broker: Broker) -> None:
    job = make_job()
    await broker.submit(job, {}, capacity=10)
    run = await broker.claim("m", "w", lease=30, timeout=0)
    assert run is not None
    await asyncio.sleep(0.3)  # the hints of the submit and the claim have come and gone
    assert not await broker.wait_change(job.id, 0.05)
    waiter = asyncio.create_task(broker.wait_change(job.id, 5))
    await asyncio.sleep(0.05)
    await broker.update(run, {"total_steps": 10}, attempt=run.attempt)
    assert await waiter
    await asyncio.sleep(0.1)
    # a step wakes progress followers only
    status_waiter = asyncio.create_task(broker.wait_change(job.id, 0.6, progress=False))
    step_waiter = asyncio.create_task(broker.wait_change(job.id, 5))
    await asyncio.sleep(0.05)
    await broker.update(run, {"step": 1, "last_step_at": broker.now()}, attempt=run.attempt)
    assert await step_waiter
    assert not await status_waiter
    # progress from a worker thread
    step_waiter = asyncio.create_task(broker.wait_change(job.id, 5))
    await asyncio.sleep(0.05)
    run.step = 2
    run.last_step_at = broker.now()
    await asyncio.to_thread(broker.progress_threadsafe, run)
    assert await step_waiter

    async def step_is_2() -> bool:
        got = await broker.get(job.id)
        return got is not None and got.step == 2

    await eventually(step_is_2)
    status_waiter = asyncio.create_task(broker.wait_change(job.id, 5, progress=False))
    await asyncio.sleep(0.05)
    assert await broker.finish(run, JobStatus.DONE, {}, attempt=run.attempt, blobs={})
    assert await status_waiter


async def test_clear_cancels_every_waiting_job(broker: Broker) -> None:
    jobs = [make_job(), make_job(model="n"), make_job(priority=2), make_job()]
    for j in jobs:
        await broker.submit(j, {}, capacity=10)
    run = await broker.claim("m", "w", lease=30, timeout=0)
    assert run is not None
    assert await broker.clear("server cleared") == 3
    assert await broker.depth("m") == (0, 1) and await broker.depth("n") == (0, 0)
    for j in jobs:
        got = await broker.get(j.id)
        assert got is not None
        if j.id == run.id:
            assert got.status is JobStatus.RUNNING
        else:
            assert got.status is JobStatus.CANCELLED and got.message == "server cleared"
    assert await broker.clear("again") == 0


async def test_cost_stats_and_priors(broker: Broker) -> None:
    assert await broker.cost_stats("m") == {}
    rng = np.random.default_rng(3)
    expect = np.zeros(STATS)
    for _ in range(3):
        feats = call_features("generate", int(rng.integers(1, 30)), float(rng.random()), 1, [0.01] * int(rng.integers(0, 3)))
        decayed, added = observation(feats, float(rng.random() * 10), float(rng.random() * 10), (0.1, 0.2, 0.3))
        assert len(decayed) == DECAYED and len(decayed) + len(added) == STATS
        await broker.observe_cost("m", "image", decayed, added, 0.9)
        by_hand = np.concatenate([0.9 * expect[:DECAYED] + decayed, expect[DECAYED:] + added])
        expect = apply(expect, decayed, added, 0.9)
        np.testing.assert_allclose(expect, by_hand)
    stats = await broker.cost_stats("m")
    assert list(stats) == ["image"]
    np.testing.assert_allclose(stats["image"], expect, rtol=1e-12)
    assert await broker.cost_stats("other") == {}
    priors = {"image": [0.5, 1.0, 0.25, 0.125, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.25, 0.1], "train": [1.0] * 12}
    await broker.set_priors("m", priors)
    assert await broker.priors("m") == priors
    assert await broker.priors("other") == {}


async def test_an_idempotency_key_is_bound_to_its_job_in_the_submit_that_queues_it(broker: Broker) -> None:
    first, second, other = make_job(), make_job(), make_job()
    assert await broker.submitted("alice:k1") is None
    assert await broker.submit(first, {}, capacity=10, idempotency=SubmitKey("alice:k1", "fp1", 60)) is None
    assert await broker.submitted("alice:k1") == (first.id, "fp1")
    # the key is bound: a second submit with it queues nothing and names the first job
    assert await broker.submit(second, {}, capacity=10, idempotency=SubmitKey("alice:k1", "fp2", 60)) == (first.id, "fp1")
    assert await broker.get(second.id) is None and await broker.depth("m") == (1, 0)
    assert await broker.submit(other, {}, capacity=10, idempotency=SubmitKey("bob:k1", "fp1", 60)) is None  # another owner
    # a submit refused (queue full) binds nothing: the key stays free
    refused = make_job()
    with pytest.raises(QueueFullError):
        await broker.submit(refused, {}, capacity=2, idempotency=SubmitKey("alice:k2", "fp", 60))
    assert await broker.submitted("alice:k2") is None
    # a retried submit of the same id (its first answer lost) changes nothing
    assert await broker.submit(first, {}, capacity=10) is None
    assert await broker.depth("m") == (2, 0)


def owned(owner: str, **kw: Any) -> JobRecord:
    return make_job(owner=owner, **kw)


async def test_admission_counts_unfinished_jobs_and_each_end_releases_one(broker: Broker) -> None:
    adm = Admission(owner="alice", cost=1.0, max_queued=2)
    a, b = owned("alice"), owned("alice")
    for job in (a, b):
        assert await broker.submit(job, {}, capacity=10, admission=adm) is None
    refused = owned("alice")
    with pytest.raises(QuotaRefused) as info:
        await broker.submit(refused, {}, capacity=10, admission=adm)
    assert info.value.limit == "max_queued" and info.value.used == 2 and sorted(info.value.jobs) == sorted([a.id, b.id])
    assert await broker.get(refused.id) is None and await broker.depth("m") == (2, 0)
    assert await broker.submit(owned("bob"), {}, capacity=10, admission=Admission(owner="bob", cost=1.0, max_queued=2)) is None
    # a bound idempotency key wins over the quota: the same request again names its job
    keyed = owned("alice")
    await broker.cancel(a.id, "room for the keyed one")  # a waiting job cancelled: released
    assert await broker.submit(keyed, {}, capacity=10, idempotency=SubmitKey("alice:k", "fp", 60), admission=adm) is None
    assert await broker.submit(owned("alice"), {}, capacity=10, idempotency=SubmitKey("alice:k", "fp", 60), admission=adm) == (keyed.id, "fp")
    # put back (a worker stopping) and claimed again: still one unfinished job, not two
    run = await broker.claim("m", "w", lease=30, timeout=0)
    assert run is not None and run.id == b.id
    assert await broker.release(run, run.attempt)
    run = await broker.claim("m", "w", lease=30, timeout=0)
    assert run is not None and run.id == b.id
    assert sorted((await broker.ledger("alice"))[0]) == sorted([b.id, keyed.id])
    with pytest.raises(QuotaRefused):
        await broker.submit(owned("alice"), {}, capacity=10, admission=adm)
    assert await broker.finish(run, JobStatus.DONE, {"worker_seconds": 0.5}, attempt=run.attempt, blobs={})
    assert (await broker.ledger("alice"))[0] == [keyed.id]
    assert await broker.submit(owned("alice"), {}, capacity=10, admission=adm) is None


async def test_admission_books_gpu_seconds_and_settles_what_the_job_measured(broker: Broker) -> None:
    adm = Admission(owner="alice", cost=0.8, budget=2.0, window=100.0)
    a, b = owned("alice"), owned("alice")
    t0 = broker.now()
    for job in (a, b):
        assert await broker.submit(job, {}, capacity=10, admission=adm) is None
    _, book = await broker.ledger("alice")
    assert [(e[0], e[2], e[3]) for e in book] == [(a.id, 0.8, True), (b.id, 0.8, True)]
    with pytest.raises(QuotaRefused) as info:  # 1.6 + 0.8 > 2, and nothing settled ages out
        await broker.submit(owned("alice"), {}, capacity=10, admission=adm)
    assert info.value.limit == "gpu_seconds_per_hour" and info.value.used == pytest.approx(1.6) and info.value.wait == 100.0
    run = await broker.claim("m", "w", lease=30, timeout=0)
    assert run is not None and run.id == a.id
    assert await broker.finish(run, JobStatus.DONE, {"worker_seconds": 0.7}, attempt=run.attempt, blobs={})
    await broker.cancel(b.id, "never ran")  # settles at nothing
    _, book = await broker.ledger("alice")
    assert [(e[0], e[2], e[3]) for e in book] == [(a.id, 0.7, False), (b.id, 0.0, False)]
    assert await broker.submit(owned("alice"), {}, capacity=10, admission=adm) is None  # 0.7 + 0.8
    with pytest.raises(QuotaRefused) as info:  # 1.5 + 0.8: fits once a's 0.7 has aged out of the window
        await broker.submit(owned("alice"), {}, capacity=10, admission=adm)
    assert info.value.used == pytest.approx(1.5)
    assert 100.0 - (broker.now() - t0) - 1 <= info.value.wait <= 100.0


async def test_concurrent_submits_of_one_owner_admit_exactly_max_queued(broker: Broker) -> None:
    adm = Admission(owner="alice", cost=0.1, max_queued=10)

    async def one() -> bool:
        try:
            return await broker.submit(owned("alice"), {}, capacity=1000, admission=adm) is None
        except QuotaRefused:
            return False

    accepted = await asyncio.gather(*(one() for _ in range(40)))
    assert sum(accepted) == 10 and await broker.depth("m") == (10, 0)


async def test_workers_presence(broker: Broker) -> None:
    info = WorkerInfo(worker="w1", model="m", host="h", state="loaded", slots=2)
    await broker.heartbeat([info], [], lease=30)
    got = await broker.workers("m")
    assert [(w.worker, w.state, w.slots) for w in got] == [("w1", "loaded", 2)]
    assert got[0].seen_at > 0
    assert [w.worker for w in await broker.workers()] == ["w1"]
    assert await broker.workers("other") == []
    await broker.leave("w1")
    assert await broker.workers("m") == []


# ----- Redis only ------------------------------------------------------------------------


@pytest.fixture
async def rbroker(redis_flushed: RedisServer, anyio_backend: str) -> AsyncIterator[Broker]:  # noqa: F811
    b = redis_broker(redis_flushed.url)
    await b.start()
    try:
        yield b
    finally:
        await b.close()


async def test_lease_expiry_requeues_once_then_errors(rbroker: Broker) -> None:
    b = rbroker
    a = make_job()
    await b.submit(a, {}, capacity=10)
    run = await b.claim("m", "w", lease=0.3, timeout=0)
    assert run is not None
    others = [make_job(), make_job(priority=-1)]
    for j in others:
        await b.submit(j, {}, capacity=10)
    assert await b.reap() == 0
    await asyncio.sleep(0.5)
    assert await b.reap() == 1
    assert await b.reap() == 0
    got = await b.get(a.id)
    assert got is not None and got.status is JobStatus.WAITING and got.lost == 1 and got.worker is None
    # the old attempt is told to stop; a late finish is refused
    assert await b.heartbeat([], [(a.id, run.attempt)], lease=30) == {a.id}
    assert not await b.finish(run, JobStatus.DONE, {}, attempt=run.attempt, blobs={})
    # back at the head of its priority (the priority -1 job still first)
    order = [j.id for j in await b.waiting("m", 10)]
    assert order == [others[1].id, a.id, others[0].id]
    st = await b.standing(got, "m")
    assert st.ahead[DIM] == 1
    np.testing.assert_allclose(st.ahead, vector(others[1]))
    assert (await b.claim("m", "w", lease=30, timeout=0)).id == others[1].id  # type: ignore[union-attr]
    run2 = await b.claim("m", "w", lease=0.3, timeout=0)
    assert run2 is not None and run2.id == a.id and run2.attempt == 2
    # a live heartbeat keeps it
    for _ in range(3):
        await asyncio.sleep(0.15)
        assert await b.heartbeat([], [(a.id, run2.attempt)], lease=0.3) == set()
        assert await b.reap() == 0
    await asyncio.sleep(0.5)
    assert await b.reap() == 1
    got = await b.get(a.id)
    assert got is not None and got.status is JobStatus.ERROR and "lost twice" in (got.message or "")
    assert got.finished_at is not None
    assert (await b.recent(1))[0].id == a.id
    assert await b.depth("m") == (1, 1)


async def test_a_reaped_job_is_booked_once_and_released_when_lost_twice(rbroker: Broker) -> None:
    adm = Admission(owner="alice", cost=1.0, max_queued=1)
    job = owned("alice")
    await rbroker.submit(job, {}, capacity=10, admission=adm)
    for lost in (1, 2):
        run = await rbroker.claim("m", "w", lease=0.2, timeout=0)
        assert run is not None and run.id == job.id
        await asyncio.sleep(0.3)  # the lease runs out
        assert await rbroker.reap() == 1
        held, _ = await rbroker.ledger("alice")
        assert held == ([job.id] if lost == 1 else []), lost  # requeued: still the one job; lost twice: released
    assert await rbroker.submit(owned("alice"), {}, capacity=10, admission=adm) is None


async def test_release_does_not_count_as_lost(rbroker: Broker) -> None:
    job = make_job()
    await rbroker.submit(job, {}, capacity=10)
    run = await rbroker.claim("m", "w", lease=0.2, timeout=0)
    assert run is not None
    assert await rbroker.release(run, run.attempt)
    await asyncio.sleep(0.3)
    assert await rbroker.reap() == 0
    got = await rbroker.get(job.id)
    assert got is not None and got.status is JobStatus.WAITING and got.lost == 0


async def test_worker_presence_expires(rbroker: Broker) -> None:
    await rbroker.heartbeat([WorkerInfo(worker="w1", model="m")], [], lease=0.2)
    assert len(await rbroker.workers("m")) == 1
    await asyncio.sleep(0.3)
    assert await rbroker.workers("m") == []
    await rbroker.reap()
    assert await rbroker.workers() == []


async def test_records_survive_a_restart(redis_server_fresh: RedisServer, anyio_backend: str) -> None:  # noqa: F811
    b = redis_broker(redis_server_fresh.url)
    await b.start()
    try:
        jobs = [make_job(p, steps=s) for p, s in [(0, 3), (1, 5), (0, 7)]]
        for j in jobs:
            await b.submit(j, {input_key(j.id, "x"): b"in"}, capacity=10)
        run = await b.claim("m", "w", lease=60, timeout=0)
        assert run is not None
        assert await b.finish(run, JobStatus.DONE, {}, attempt=run.attempt, blobs={result_key(run.id, 0): b"img"})
        redis_server_fresh.restart()
        got = await b.get(jobs[1].id)  # the same client reconnects
        assert got is not None and got.status is JobStatus.WAITING
        assert await b.get_blob(result_key(jobs[0].id, 0)) == b"img"
        st = await b.standing(jobs[1], "m")
        np.testing.assert_allclose(st.ahead, vector(jobs[2]))
        # the events reader survived too
        waiter = asyncio.create_task(b.wait_change(jobs[1].id, 5))
        await asyncio.sleep(0.2)
        await b.update(jobs[1], {"total_steps": 5})
        assert await waiter
    finally:
        await b.close()
    b2 = redis_broker(redis_server_fresh.url)
    await b2.start()
    try:
        assert [j.id for j in await b2.waiting("m", 10)] == [jobs[2].id, jobs[1].id]
        assert (await b2.recent(5))[0].id == jobs[0].id
        nxt = await b2.claim("m", "w", lease=60, timeout=0)
        assert nxt is not None and nxt.id == jobs[2].id
    finally:
        await b2.close()


async def test_redis_down_raises_broker_unavailable(redis_server_fresh: RedisServer, anyio_backend: str) -> None:  # noqa: F811
    b = redis_broker(redis_server_fresh.url)
    await b.start()
    try:
        job = make_job()
        await b.submit(job, {}, capacity=10)
        redis_server_fresh.stop()
        for call in (
            lambda: b.get(job.id),
            lambda: b.submit(make_job(), {}, capacity=10),
            lambda: b.claim("m", "w", lease=10, timeout=0),
            lambda: b.standing(job, "m"),
            lambda: b.heartbeat([], [], lease=10),
            lambda: b.reap(),
        ):
            with pytest.raises(BrokerUnavailable, match="is not reachable"):
                await call()
        await asyncio.sleep(0.3)  # the reader keeps retrying meanwhile
        redis_server_fresh.start()
        assert (await b.get(job.id)) is not None
    finally:
        await b.close()
    dead = redis_broker(redis_server_fresh.url.replace(str(redis_server_fresh.port), "1"))
    with pytest.raises(BrokerUnavailable):
        await dead.start()
    await dead.close()


async def test_events_reach_a_second_node(redis_flushed: RedisServer, anyio_backend: str) -> None:  # noqa: F811
    a = redis_broker(redis_flushed.url)
    b = redis_broker(redis_flushed.url)
    await a.start()
    await b.start()
    try:
        cancels: list[str] = []
        commands: list[tuple[str, str]] = []
        b.on_cancel(cancels.append)
        b.on_command(lambda m, act: commands.append((m, act)))
        job = make_job()
        claimer = asyncio.create_task(b.claim("m", "w", lease=30, timeout=5))
        await asyncio.sleep(0.1)
        await a.submit(job, {}, capacity=10)
        run = await asyncio.wait_for(claimer, 5)
        assert run is not None and run.id == job.id
        waiter = asyncio.create_task(b.wait_change(job.id, 5))
        await asyncio.sleep(0.05)
        await a.update(job, {"total_steps": 4})
        assert await waiter
        await a.cancel(job.id, "stop")
        await eventually(lambda: cancels == [job.id])
        await a.command("m", "load")
        await eventually(lambda: commands == [("m", "load")])
    finally:
        await a.close()
        await b.close()


async def test_a_reader_behind_a_trimmed_stream_wakes_everyone(redis_flushed: RedisServer, anyio_backend: str) -> None:  # noqa: F811
    from server.broker.redis import RedisBroker

    a = redis_broker(redis_flushed.url, events_maxlen=5)
    b = redis_broker(redis_flushed.url, events_maxlen=5)
    await a.start()
    await b.start()
    try:
        assert isinstance(b, RedisBroker) and b._reader is not None
        followed = make_job()
        await a.submit(followed, {}, capacity=10)
        await eventually(lambda: b.last_event_id != b"0-0")
        b._reader.cancel()  # b falls behind...
        with pytest.raises(asyncio.CancelledError):
            await b._reader
        waiter = asyncio.create_task(b.wait_change(followed.id, 5))
        for _ in range(300):  # ...while the stream is trimmed past its last event
            await a.command("m", "noop")
        b._reader = asyncio.create_task(b._read_events(b.last_event_id))
        assert await waiter  # no event of that job came: it was woken because some were lost
    finally:
        await a.close()
        await b.close()


async def test_a_fenced_blob_is_stored_only_while_its_attempt_runs(broker: Broker) -> None:
    job = make_job()
    await broker.submit(job, {}, capacity=10)
    assert not await broker.put_attempt_blob(job.id, 1, "prev:x:0", b"waiting")  # not running yet
    claimed = await broker.claim("m", "w", lease=TTL, timeout=1)
    assert claimed is not None
    assert not await broker.put_attempt_blob(job.id, claimed.attempt + 1, "prev:x:0", b"another attempt")
    assert await broker.get_blob("prev:x:0") is None
    assert await broker.put_attempt_blob(job.id, claimed.attempt, "prev:x:0", b"ours")
    assert await broker.get_blob("prev:x:0") == b"ours"
    assert await broker.finish(claimed, JobStatus.DONE, {}, attempt=claimed.attempt, blobs={result_key(job.id, 0): b"img"})
    assert not await broker.put_attempt_blob(job.id, claimed.attempt, "prev:x:1", b"after the end")
    assert not await broker.finish(claimed, JobStatus.DONE, {}, attempt=claimed.attempt, blobs={result_key(job.id, 0): b"again"})
    assert await broker.get_blob(result_key(job.id, 0)) == b"img"


async def test_a_job_that_ends_with_a_webhook_to_send_joins_the_outbox_in_the_same_step(broker: Broker) -> None:
    hooked, plain, cancelled = make_job(webhook_url="http://h/x", webhook="pending"), make_job(), make_job(webhook_url="http://h/y", webhook="pending")
    for job in (hooked, plain, cancelled):
        await broker.submit(job, {}, capacity=10)
    assert await broker.claim_deliveries(60, 10) == []  # nothing ended yet
    await broker.cancel(cancelled.id, "cancelled before it ran")
    run = await broker.claim("m", "w", lease=TTL, timeout=1)
    assert run is not None and run.id == hooked.id
    assert await broker.finish(run, JobStatus.DONE, {}, attempt=run.attempt, blobs={})
    other = await broker.claim("m", "w", lease=TTL, timeout=1)
    assert other is not None and await broker.finish(other, JobStatus.DONE, {}, attempt=other.attempt, blobs={})
    assert sorted(await broker.claim_deliveries(60, 10)) == sorted([hooked.id, cancelled.id])
    assert await broker.claim_deliveries(60, 10) == []  # claimed: not due again within the claim
    await broker.end_delivery(hooked.id, {"webhook": "ok"})
    got = await broker.get(hooked.id)
    assert got is not None and got.webhook == "ok"
    await broker.end_delivery(cancelled.id, {}, retry_in=0.0)  # failed: due again at once
    assert await broker.claim_deliveries(60, 10, cancelled.id) == [cancelled.id]
    await broker.end_delivery(cancelled.id, {})
    assert await broker.claim_deliveries(0, 10) == []
    missed = make_job(webhook_url="http://h/z", webhook="pending")  # a missed deadline ends a waiting job
    await broker.submit(missed, {}, capacity=10)
    assert await broker.finish(missed, JobStatus.ERROR, {"message": "deadline missed"}, attempt=None, blobs={}, only_waiting=True)
    assert await broker.claim_deliveries(60, 10) == [missed.id]
