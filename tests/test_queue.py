"""The priority queue: order, positions and forecast sums without scans."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from server.features import DIM, WIDTH, job_vector
from server.forecast import call_features
from server.queue import Job, ModelQueue


def make_job(priority: int = 0, steps: int = 4, seq: int = 0) -> Job:
    return Job(f"j{seq}", priority, seq, job_vector("generate", call_features("generate", steps, 64 * 64 / 1e6, 1)))


def brute_ahead(jobs: list[Job], job: Job) -> tuple[int, np.ndarray]:
    ahead = [j for j in jobs if (j.priority, j.seq) < (job.priority, job.seq)]
    return len(ahead), sum((j.vector for j in ahead), np.zeros(WIDTH))


def test_lower_priority_first_fifo_within_a_priority() -> None:
    q = ModelQueue(100)
    jobs = [make_job(p, seq=i) for i, p in enumerate([0, 0, -1, 5, -1, 0])]
    for j in jobs:
        q.push(j)
    order = [q.pop_nowait() for _ in jobs]
    assert [(j.priority, j.seq) for j in order] == sorted((j.priority, j.seq) for j in jobs)
    assert q.pop_nowait() is None and len(q) == 0


@pytest.mark.parametrize("push_share", [0.6, 0.4])  # a growing queue (compactions), one often empty
def test_positions_and_sums_match_a_brute_force_count_under_random_operations(push_share: float) -> None:
    rng = random.Random(1)
    q = ModelQueue(100_000)
    live: list[Job] = []
    seq = 0
    for _ in range(3000):
        op = rng.random()
        if op < push_share or not live:
            seq += 1
            j = make_job(rng.choice([-1, 0, 0, 0, 3]), steps=rng.randint(1, 30), seq=seq)
            q.push(j)
            live.append(j)
        elif op < push_share + 0.2:
            j = live.pop(rng.randrange(len(live)))
            assert q.remove(j)
        else:
            j = q.pop_nowait()
            assert j is not None
            assert (j.priority, j.seq) == min((x.priority, x.seq) for x in live)
            live.remove(j)
        if live and rng.random() < 0.2:
            probe = rng.choice(live)
            count, vec = brute_ahead(live, probe)
            got = q.ahead(probe)
            assert int(got[DIM]) == count
            np.testing.assert_allclose(got[:DIM], vec[:DIM], atol=1e-6)
        if rng.random() < 0.05:
            np.testing.assert_allclose(q.total(), sum((j.vector for j in live), np.zeros(WIDTH)), atol=1e-6)
    assert len(q) == len(live)
    assert sorted(id(j) for j in q.jobs()) == sorted(id(j) for j in live)


def test_removed_job_is_not_in_the_queue_twice() -> None:
    q = ModelQueue(10)
    a, b = make_job(seq=1), make_job(seq=2)
    q.push(a)
    q.push(b)
    assert q.remove(a)
    assert not q.remove(a)
    assert q.pop_nowait() is b


def test_push_front_goes_ahead_of_its_priority_only() -> None:
    q = ModelQueue(10)
    urgent, a, b, rerun = make_job(-1, seq=1), make_job(0, seq=2), make_job(0, seq=3), make_job(0, seq=4)
    for j in (urgent, a, b):
        q.push(j)
    q.push_front(rerun)
    assert int(q.ahead(rerun)[DIM]) == 1  # behind the priority job only
    assert [q.pop_nowait() for _ in range(4)] == [urgent, rerun, a, b]


def test_get_waits_for_a_push_and_close_releases_waiters() -> None:
    async def scenario() -> None:
        q = ModelQueue(10)
        assert await q.get(0.01) is None  # nothing came
        waiter = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        job = make_job(seq=1)
        q.push(job)
        assert await asyncio.wait_for(waiter, 1) is job
        closing = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        q.close()
        assert await asyncio.wait_for(closing, 1) is None

    asyncio.run(scenario())


@pytest.mark.parametrize("n", [10, 5000])
def test_full_flag_follows_capacity(n: int) -> None:
    q = ModelQueue(n)
    for i in range(n):
        q.push(make_job(seq=i))
    assert q.full and len(q) == n


def test_fair_share_sums_follow_the_run_order_through_compactions_cancels_and_moves() -> None:
    rng = random.Random(5)
    q = ModelQueue(100_000)
    live: list[Job] = []
    for seq in range(1, 4000):
        op = rng.random()
        if op < 0.55 or not live:
            j = make_job(rng.choice([0, 0, 0, 2]), steps=rng.randint(1, 30), seq=seq)
            j.share, j.weight = rng.choice([("a", 1), ("a", 1), ("b", 2), ("c", 5)])
            q.push(j)
            live.append(j)
        elif op < 0.7:
            assert q.remove(live.pop(rng.randrange(len(live))))
        elif op < 0.8:
            assert q.move(rng.choice(live), front=rng.random() < 0.5, first=rng.random() < 0.2)
        else:
            expected = q.jobs(1)[0]
            assert q.pop_nowait() is expected
            live.remove(expected)
        if live and rng.random() < 0.1:
            order = q.jobs()
            probe = rng.choice(live)
            ahead = order[: order.index(probe)]
            got = q.ahead(probe)
            assert int(round(got[DIM])) == len(ahead)
            np.testing.assert_allclose(got, sum((j.vector for j in ahead), np.zeros(WIDTH)), atol=1e-6)
    assert sorted(j.id for j in q.jobs()) == sorted(j.id for j in live)
