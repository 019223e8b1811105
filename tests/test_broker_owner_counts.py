"""The brokers count each owner's finished jobs (``finished_of``: /api/tasks totals
without a pass over every finished job), over both brokers: every way a job ends
counts for its owner, anonymous jobs apart, a waiting or running one not at all."""

from __future__ import annotations

import anyio
import pytest

from server.broker.base import Broker
from server.jobs import JobStatus

from .redis_fixtures import redis_flushed, redis_server  # noqa: F401 - fixtures
from .test_broker_contract import anyio_backend, broker, make_job  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio


async def test_each_owners_finished_jobs_are_counted_however_they_ended(broker: Broker) -> None:  # noqa: F811
    jobs = [make_job(owner="alice") for _ in range(4)] + [make_job(owner="bob"), make_job()]
    for job in jobs:
        await broker.submit(job, {}, capacity=100)
    done = await broker.claim("m", "w", lease=30, timeout=0)
    assert done is not None and done.owner == "alice"
    assert await broker.finish(done, JobStatus.DONE, {}, attempt=done.attempt, blobs={})
    await broker.cancel(jobs[1].id, "cancelled")  # waiting: ends at once
    assert await broker.finish(jobs[2], JobStatus.ERROR, {"message": "missed"}, attempt=None, blobs={}, only_waiting=True)
    running = await broker.claim("m", "w", lease=30, timeout=0)  # alice's fourth: running, not finished
    assert running is not None and running.id == jobs[3].id
    assert await broker.finished_of("alice") == 3
    assert await broker.finished_of("bob") == 0 and await broker.finished_of(None) == 0
    await broker.cancel(jobs[5].id, "cancelled")
    assert await broker.finished_of(None) == 1 and await broker.finished_of("carol") == 0
    assert await broker.finished_count() == 4


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_expired_finished_jobs_leave_the_counts_and_the_owners_lists(kind: str, request: pytest.FixtureRequest) -> None:
    """A finished job is forgotten ``result_ttl`` after it ended: the counts drop it;
    in Redis the next job to finish takes it out of ``done``, and its owner's
    ``done:{owner}`` expires with it (neither grows with owners who never list)."""
    from server.broker.memory import MemoryBroker
    from server.broker.redis import RedisBroker

    b: Broker = (
        MemoryBroker(result_ttl=1, result_memory_bytes=1 << 20)
        if kind == "memory"
        else RedisBroker(request.getfixturevalue("redis_flushed").url, result_ttl=1)
    )
    await b.start()
    try:
        old = make_job(owner="alice")
        await b.submit(old, {}, capacity=10)
        await b.cancel(old.id, "cancelled")  # finished now
        deadline = anyio.current_time() + 10
        while await b.get(old.id) is not None:  # expired: no event says so
            assert anyio.current_time() < deadline, "the finished job never expired"
            await anyio.sleep(0.1)
        new = make_job(owner="bob")
        await b.submit(new, {}, capacity=10)
        await b.cancel(new.id, "cancelled")
        if isinstance(b, RedisBroker):  # before any count trims them
            assert not await b._redis.exists(b.keys.owner_done("alice"))
            assert await b._redis.zrange(b.keys.done(), 0, -1) == [new.id.encode()]
        assert await b.finished_count() == 1
        assert await b.finished_of("alice") == 0 and await b.finished_of("bob") == 1
    finally:
        await b.close()
