"""The Redis broker's accounts: worker presence and the reaper, the forecast's
statistics and priors, idempotent submits and the GPU-seconds ledger.

A node gathers what its finished jobs teach the forecast for ``LEARN_INTERVAL``
seconds and writes it in one script call per model and fit (``observe_cost`` with
the product of the forgetting factors: the same statistics as one call per job).
So the write never sits between a finished job and the API node reading it, and a
busy worker sends one 262-number update per interval, not one per job.  The node's
own reads (``cost_stats``) write what it gathered first; ``close`` writes the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
import numpy as np

from .base import WorkerInfo
from .redis_base import RedisBase
from .redis_codec import (
    ERRORS,
    LOST_TWICE,
    REAP_BATCH,
    guarded,
    to_json,
)

log = logging.getLogger("server.broker.redis")
LEARN_INTERVAL = 0.5  # seconds a node gathers its jobs' forecast observations before writing them


class _Learned:
    """Observations of one model and fit not written yet, folded: the statistics
    become ``forget * old + decayed`` (their first part) and ``old + added``."""

    def __init__(self, width_decayed: int, width_added: int) -> None:
        self.forget = 1.0
        self.decayed = np.zeros(width_decayed)
        self.added = np.zeros(width_added)

    def fold(self, decayed: list[float] | np.ndarray, added: list[float] | np.ndarray, forget: float) -> None:
        """Then this observation (or what another ``_Learned`` gathered after these)."""
        self.decayed = forget * self.decayed + np.asarray(decayed)
        self.added = self.added + np.asarray(added)
        self.forget *= forget


class RedisAccounts(RedisBase):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._learned: dict[tuple[str, str], _Learned] = {}
        self._learn_task: asyncio.Task[None] | None = None
        self._learn_lock = asyncio.Lock()  # one write at a time: they land in the order gathered

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
        raws = await self._script("workers", *([model] if model is not None else []))  # one round trip
        return [msgspec.json.decode(raw, type=WorkerInfo) for raw in raws]

    @guarded
    async def reap(self) -> int:
        sent = time.time()
        redis_time, handled = await self._script("reap", self._ttl_seconds(), to_json(LOST_TWICE), REAP_BATCH)
        self._set_clock(float(redis_time), sent, time.time())
        return int(handled)

    async def _models(self) -> list[str]:
        return sorted(m.decode() for m in await self._redis.smembers(self.keys.models()))

    async def observe_cost(self, model: str, task: str, decayed: list[float], added: list[float], forget: float) -> None:
        learned = self._learned.get((model, task))
        if learned is None:
            learned = self._learned[(model, task)] = _Learned(len(decayed), len(added))
        learned.fold(decayed, added, forget)
        if self._learn_task is None and not self._closed:
            self._learn_task = asyncio.create_task(self._learn_later())

    async def _learn_later(self) -> None:
        try:
            await asyncio.sleep(LEARN_INTERVAL)
            await self._write_learned()
        except ERRORS as exc:  # kept for the next write
            log.warning("forecast statistics not written (Redis at %s): %s", self.address, exc)
        except Exception:
            log.exception("forecast statistics not written")
        finally:
            self._learn_task = None
            if self._learned and not self._closed:
                self._learn_task = asyncio.create_task(self._learn_later())

    async def _write_learned(self, model: str | None = None) -> None:
        """Write what was gathered (of ``model``, or of every model); on a failure what
        was not written is kept, before anything gathered since."""
        async with self._learn_lock:
            for key in [k for k in self._learned if model is None or k[0] == model]:
                learned = self._learned.pop(key)
                args = [repr(float(x)) for x in (*learned.decayed, *learned.added)]
                try:
                    await self._script("observe_cost", key[0], key[1], repr(learned.forget), len(learned.decayed), *args)
                except BaseException:
                    newer = self._learned.pop(key, None)
                    if newer is not None:
                        learned.fold(newer.decayed, newer.added, newer.forget)
                    self._learned[key] = learned
                    raise

    async def close(self) -> None:
        self._closed = True
        if self._learn_task is not None:
            self._learn_task.cancel()
            with contextlib.suppress(BaseException):
                await self._learn_task
        with contextlib.suppress(Exception):
            await self._write_learned()
        await super().close()

    @guarded
    async def cost_stats(self, model: str) -> dict[str, list[float]]:
        await self._write_learned(model)  # this node's own observations first
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
