"""The Redis broker's connection, clock and scripts: what its parts share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis

from ..jobs import JobRecord
from . import redis_scripts
from .keys import Keys
from .notify import LocalEvents
from .redis_codec import (
    client_options,
    decode_record,
    guarded,
)

log = logging.getLogger("server.broker.redis")


class RedisBase(LocalEvents):
    name = "redis"
    distributed = True

    def __init__(
        self,
        url: str,
        *,
        result_ttl: float,
        prefix: str = "easel:",
        events_maxlen: int = 10000,
        all_events: bool = True,
        timeout: float = 2.0,
    ) -> None:
        """``all_events`` False (a worker-only process): read only the workers' stream
        (submit, cancel, command), so the worker's loop is not woken by every change
        and step of every job while its model runs.  ``timeout``: seconds a call waits
        for Redis's answer before it fails (``BrokerUnavailable``)."""
        self.url = url
        self.timeout = timeout
        self.ttl = result_ttl
        self.keys = Keys(prefix)
        self.events_key = self.keys.events() if all_events else self.keys.worker_events()
        self.prefix = prefix
        self.events_maxlen = events_maxlen
        LocalEvents.__init__(self)
        self._redis: Any = aioredis.Redis.from_url(url, **client_options(socket_timeout=timeout))  # redis-py types are loose
        kw = self._redis.connection_pool.connection_kwargs
        self.address = f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        self._scripts = {name: self._redis.register_script(text) for name, text in redis_scripts.SCRIPTS.items()}
        self._offset = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reader_redis: Any = None
        self._claim_waiters: dict[str, set[asyncio.Event]] = {}
        self._progress_jobs: dict[str, JobRecord] = {}  # job id -> the newest record to write
        self._progress_tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self.last_event_id = b"0-0"  # the last event the reader handled

    def _ttl_seconds(self) -> int:
        return max(1, math.ceil(self.ttl))

    async def _script(self, name: str, *args: Any) -> Any:
        return await self._scripts[name](keys=[], args=[self.prefix, self.events_maxlen, *args])

    def _set_clock(self, redis_time: float, sent: float, received: float) -> None:
        self._offset = redis_time - (sent + received) / 2

    async def _measure_clock(self) -> None:
        sent = time.time()
        secs, micros = await self._redis.time()
        self._set_clock(secs + micros / 1e6, sent, time.time())

    def now(self) -> float:
        return time.time() + self._offset

    @guarded
    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._reader, *self._progress_tasks.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self._reader = None
        self._progress_tasks.clear()
        if self._reader_redis is not None:
            with contextlib.suppress(Exception):
                await self._reader_redis.aclose()
            self._reader_redis = None
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    async def _records(self, raw_ids: Iterable[bytes | str]) -> list[tuple[str, JobRecord | None]]:
        ids = [i.decode() if isinstance(i, bytes) else i for i in raw_ids]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            raws = await pipe.execute()
        return [(job_id, decode_record(raw)) for job_id, raw in zip(ids, raws, strict=True)]

    def _valid_until(self) -> str:
        """The broker time after which a script sent now must not act: its answer
        would come after this call gave up (half the timeout leaves room for the
        answer's way back and the clock offset's error)."""
        return repr(self.now() + self.timeout / 2)
