"""A Redis node writes what its jobs teach the forecast in one script call per
interval (server/broker/redis_accounts.py): the same statistics as one call per
job, read back at once by the node itself, seen by another node within the
interval, and written when the node closes."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from server.broker.redis_accounts import LEARN_INTERVAL
from server.features import STATS, apply
from server.forecast import call_features, observation

from .redis_fixtures import RedisServer, command_calls, redis_flushed, redis_server  # noqa: F401
from .test_broker_contract import anyio_backend, redis_broker  # noqa: F401

pytestmark = pytest.mark.anyio


def observations(n: int, seed: int) -> list[tuple[list[float], list[float], float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feats = call_features("generate", int(rng.integers(1, 30)), float(rng.random()), 1, [])
        decayed, added = observation(feats, float(rng.random() * 10), float(rng.random() * 10), (0.1, 0.2, 0.3))
        out.append((decayed, added, float(0.9 + 0.1 * rng.random())))
    return out


def one_by_one(obs: list[tuple[list[float], list[float], float]]) -> np.ndarray:
    stats = np.zeros(STATS)
    for decayed, added, forget in obs:
        stats = apply(stats, decayed, added, forget)
    return stats


async def test_a_node_writes_its_jobs_observations_in_one_call_that_equals_one_per_job(
    redis_flushed: RedisServer,  # noqa: F811
    anyio_backend: str,  # noqa: F811
) -> None:
    worker, api = redis_broker(redis_flushed.url), redis_broker(redis_flushed.url)
    await worker.start()
    await api.start()
    try:
        obs = observations(7, 1)
        await worker.observe_cost("m", "image", *obs[0])
        await worker.cost_stats("m")  # (the script is loaded: its first call counts twice)
        r = worker._redis  # type: ignore[attr-defined]
        before = await command_calls(r, "evalsha")
        for decayed, added, forget in obs[1:4]:
            await worker.observe_cost("m", "image", decayed, added, forget)
        stats = await worker.cost_stats("m")  # the node's own read: what it gathered is written first
        np.testing.assert_allclose(stats["image"], one_by_one(obs[:4]), rtol=1e-12)
        assert await command_calls(r, "evalsha") - before == 1
        sent = time.monotonic()
        for decayed, added, forget in obs[4:]:
            await worker.observe_cost("m", "image", decayed, added, forget)
        while (await api.cost_stats("m"))["image"] != pytest.approx(one_by_one(obs), rel=1e-12):  # another node
            assert time.monotonic() - sent < LEARN_INTERVAL + 5, "the observations never reached Redis"
            await asyncio.sleep(0.05)
        assert time.monotonic() - sent >= LEARN_INTERVAL * 0.9  # gathered for the interval, not written one by one
    finally:
        await worker.close()
        await api.close()


async def test_what_a_closing_node_gathered_is_written(redis_flushed: RedisServer, anyio_backend: str) -> None:  # noqa: F811
    node = redis_broker(redis_flushed.url)
    await node.start()
    obs = observations(2, 2)
    for decayed, added, forget in obs:
        await node.observe_cost("m", "edit", decayed, added, forget)
    await node.close()
    after = redis_broker(redis_flushed.url)
    await after.start()
    try:
        np.testing.assert_allclose((await after.cost_stats("m"))["edit"], one_by_one(obs), rtol=1e-12)
    finally:
        await after.close()
