"""The Redis broker's accounts: worker presence and the reaper, the forecast's
statistics and priors, idempotent submits and the GPU-seconds ledger."""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from .base import WorkerInfo
from .redis_base import RedisBase
from .redis_codec import (
    LOST_TWICE,
    REAP_BATCH,
    guarded,
    to_json,
)

log = logging.getLogger("server.broker.redis")


class RedisAccounts(RedisBase):
    @guarded
    async def heartbeat(self, infos: list[WorkerInfo], running: list[tuple[str, int]], lease: float) -> set[str]:
        now = self.now()
        args: list[Any] = [float(lease), len(infos)]
        for info in infos:
            info.seen_at = now
            args += [info.model, info.worker, to_json(info)]
        for job_id, attempt in running:
            args += [job_id, str(attempt)]
        sent = time.time()
        redis_time, stop = await self._script("heartbeat", *args)
        self._set_clock(float(redis_time), sent, time.time())
        return {i.decode() for i in stop}

    @guarded
    async def leave(self, worker: str) -> None:
        models = await self._models()
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zrem(self.keys.presence(model), worker)
                pipe.hdel(self.keys.worker_info(model), worker)
            await pipe.execute()

    @guarded
    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        models = [model] if model is not None else await self._models()
        now = self.now()
        out: list[WorkerInfo] = []
        for m in models:
            names = await self._redis.zrangebyscore(self.keys.presence(m), now, "+inf")
            if not names:
                continue
            raws = await self._redis.hmget(self.keys.worker_info(m), names)
            out += [msgspec.json.decode(raw, type=WorkerInfo) for raw in raws if raw is not None]
        return out

    @guarded
    async def reap(self) -> int:
        sent = time.time()
        redis_time, handled = await self._script("reap", self._ttl_seconds(), to_json(LOST_TWICE), REAP_BATCH)
        self._set_clock(float(redis_time), sent, time.time())
        return int(handled)

    async def _models(self) -> list[str]:
        return sorted(m.decode() for m in await self._redis.smembers(self.keys.models()))

    @guarded
    async def observe_cost(self, model: str, task: str, decayed: list[float], added: list[float], forget: float) -> None:
        await self._script(
            "observe_cost", model, task, repr(float(forget)), len(decayed), *(repr(float(x)) for x in (*decayed, *added))
        )

    @guarded
    async def cost_stats(self, model: str) -> dict[str, list[float]]:
        raw = await self._redis.hgetall(self.keys.cost(model))
        return {k.decode(): [float(x) for x in msgspec.json.decode(v)] for k, v in raw.items()}

    @guarded
    async def set_priors(self, model: str, priors: dict[str, list[float]]) -> None:
        key = self.keys.priors(model)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if priors:
                pipe.hset(key, mapping={t: to_json([float(x) for x in v]) for t, v in priors.items()})
            await pipe.execute()

    @guarded
    async def priors(self, model: str) -> dict[str, list[float]]:
        raw = await self._redis.hgetall(self.keys.priors(model))
        return {k.decode(): [float(x) for x in msgspec.json.decode(v)] for k, v in raw.items()}

    def stats_version(self, model: str) -> int | None:
        return None

    @guarded
    async def submitted(self, key: str) -> tuple[str, str] | None:
        kept = await self._redis.get(self.keys.submit(key))
        if kept is None:
            return None
        held_id, _, held_fp = kept.decode().partition(" ")
        if not await self._redis.exists(self.keys.job(held_id)):
            return None
        return held_id, held_fp

    @guarded
    async def ledger(self, owner: str) -> tuple[list[str], list[tuple[str, float, float, bool]]]:
        # booked by the submit script, settled by the scripts that end jobs (lua/submit.lua)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.smembers(self.keys.held(owner))
            pipe.hgetall(self.keys.ledger(owner))
            held, book = await pipe.execute()
        entries = []
        for job_id, raw in book.items():
            at, seconds, open_ = msgspec.json.decode(raw)
            entries.append((job_id.decode(), float(at), float(seconds), bool(open_)))
        return sorted(i.decode() for i in held), sorted(entries, key=lambda e: e[1])
