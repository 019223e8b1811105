"""The pause in the broker contract, over both brokers: a paused queue is claimed
from by nobody (one job or a batch) while it keeps queueing, another model's queue
runs on, a resume wakes a waiting claim, and every queue's pause and a model's own
are separate flags."""

from __future__ import annotations

import asyncio

import pytest

from server.broker.base import ALL, BatchPlan, Broker

from .redis_fixtures import redis_flushed, redis_server  # noqa: F401 - fixtures
from .test_broker_contract import anyio_backend, broker, make_job  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio


async def test_a_paused_queue_gives_no_job_or_batch_until_a_resume_wakes_the_waiting_claim(broker: Broker) -> None:  # noqa: F811
    await broker.pause("m", True)
    assert await broker.paused() == {"m"}
    job, other = make_job(batch="b"), make_job(model="n")
    assert await broker.submit(job, {}, capacity=10) is None  # submissions still queue
    await broker.submit(other, {}, capacity=10)
    assert await broker.claim("m", "w", lease=30, timeout=0.2) is None
    assert await broker.claim_batch("m", "w", 30, BatchPlan(head=job.id, ids=[], window=[job.id])) == []
    assert await broker.depth("m") == (1, 0)
    got = await broker.claim("n", "w", lease=30, timeout=0)
    assert got is not None and got.id == other.id
    waiter = asyncio.create_task(broker.claim("m", "w", lease=30, timeout=30))
    await asyncio.sleep(0.05)  # let the claim start waiting (a resume before it would be no test of the wake-up)
    await broker.pause("m", False)
    claimed = await asyncio.wait_for(waiter, 5)  # well before its 30 s: the resume woke it
    assert claimed is not None and claimed.id == job.id and await broker.paused() == set()


async def test_every_queues_pause_and_a_models_own_are_separate(broker: Broker) -> None:  # noqa: F811
    job = make_job()
    await broker.submit(job, {}, capacity=10)
    await broker.pause(ALL, True)
    assert await broker.paused() == {ALL}
    assert await broker.claim("m", "w", lease=30, timeout=0) is None
    await broker.pause("m", True)
    await broker.pause(ALL, False)
    assert await broker.paused() == {"m"}
    assert await broker.claim("m", "w", lease=30, timeout=0) is None
    await broker.pause("m", False)
    got = await broker.claim("m", "w", lease=30, timeout=0)
    assert got is not None and got.id == job.id
