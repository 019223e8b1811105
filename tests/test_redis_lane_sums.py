"""The Redis queue's per-lane sums (server/broker/redis_scripts.py): a push climbs its
lane's Fenwick tree only as high as a prefix of the lane reads (about log2 n nodes
per entry, not 32), and a tree left by the version that climbed to 2^32 for every
update keeps giving right sums.  (What the sums must be, over both brokers, is in
test_broker_contract.py.)"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from server.broker.base import Broker
from server.features import DIM, WIDTH
from server.jobs import JobRecord, JobStatus

from .redis_fixtures import command_calls, redis_flushed, redis_server  # noqa: F401
from .test_broker_contract import anyio_backend, make_job, rbroker, vector  # noqa: F401

pytestmark = pytest.mark.anyio
TWO32 = 2**32


async def _node_updates(b: Broker, job: JobRecord) -> int:
    """The HINCRBYFLOAT calls of one submit (redis-server's own count)."""
    r = b._redis  # type: ignore[attr-defined]
    before = await command_calls(r, "hincrbyfloat")
    await b.submit(job, {}, capacity=100_000)
    return await command_calls(r, "hincrbyfloat") - before


async def test_a_push_updates_about_log2_n_nodes_per_entry(rbroker: Broker) -> None:  # noqa: F811
    b = rbroker
    first = make_job()
    entries = int(np.count_nonzero(vector(first)))
    assert await _node_updates(b, first) <= 2 * entries  # the totals and one node (the version before: 33 per entry)
    for _ in range(1000):
        await b.submit(make_job(), {}, capacity=100_000)
    depth = (await b.depth("m"))[0]
    # the totals, one doubling of the capacity at most, and a climb of log2(1024) + 1 nodes
    assert await _node_updates(b, make_job()) <= (3 + math.ceil(math.log2(depth))) * entries


async def _rewrite_as_the_version_before(b: Broker) -> str:
    """Every lane's tree as the version before this one wrote it: each waiting job's
    vector climbed to node 2^32, and no capacity field.  The lanes hold no popped
    heads (nothing was claimed)."""
    r, prefix = b._redis, b.prefix  # type: ignore[attr-defined]
    lanes = [k async for k in r.scan_iter(match=prefix + "ln:*")]
    assert len(lanes) == 1
    lane = lanes[0].decode()
    tree = prefix + "fen:" + lane[len(prefix + "ln:") :]
    await r.delete(tree)
    for job_id, score in await r.zrange(lane, 0, -1, withscores=True):
        vec = (await r.hget(f"{prefix}job:{job_id.decode()}", "vec")).decode()
        for part in vec.split(";"):
            e, v = part.split("=")
            await r.hset(tree, f"u:{e}", 1)
            await r.hincrbyfloat(tree, f"t:{e}", float(v))
            i = int(score) + 1
            while i <= TWO32:
                await r.hincrbyfloat(tree, f"{i}:{e}", float(v))
                i += i & -i
    assert not await r.hexists(tree, "c")
    return tree


async def test_a_lane_left_by_the_version_that_climbed_to_2_32_keeps_its_sums(rbroker: Broker) -> None:  # noqa: F811
    b = rbroker
    rng = random.Random(3)
    live: list[JobRecord] = []
    order: dict[str, tuple[int, int]] = {}  # job id -> run order: a re-run below every seq
    for _ in range(12):
        j = make_job(steps=rng.randint(1, 30), task=rng.choice(["generate", "edit"]))
        await b.submit(j, {}, capacity=1000)
        live.append(j)
        order[j.id] = (0, j.seq)
    tree = await _rewrite_as_the_version_before(b)
    heads = 0
    for step in range(200):
        op = rng.random()
        if op < 0.5 or not live:
            j = make_job(steps=rng.randint(1, 30), task=rng.choice(["generate", "edit"]))
            await b.submit(j, {}, capacity=1000)
            live.append(j)
            order[j.id] = (0, j.seq)
        elif op < 0.7:
            j = live.pop(rng.randrange(len(live)))
            assert (rec := await b.cancel(j.id, "gone")) is not None and rec.status is JobStatus.CANCELLED
        else:
            got = await b.claim("m", "w", lease=30, timeout=0)
            head = min(live, key=lambda x: order[x.id])
            assert got is not None and got.id == head.id
            if op < 0.8:
                assert await b.release(got, got.attempt)
                heads += 1
                order[got.id] = (0, -heads)
            else:
                live.remove(head)
        if live:
            probe = rng.choice(live)
            ahead = [x for x in live if order[x.id] < order[probe.id]]
            st = await b.standing(probe, "m")
            assert int(round(st.ahead[DIM])) == len(ahead), step
            np.testing.assert_allclose(st.ahead, sum((vector(x) for x in ahead), np.zeros(WIDTH)), atol=1e-6)
    assert not await b._redis.hexists(tree, "c")  # type: ignore[attr-defined]  # the old tree all along (the lane never emptied)
