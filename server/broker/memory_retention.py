"""The memory broker's bytes and how long finished jobs stay (``base.Store``'s blobs):
the input, preview and result images of every job, the finished jobs in the order they
finished, and their expiry: a finished job is forgotten ``result_ttl`` seconds after it
ended (with its images), and result images over ``result_memory_bytes`` go first, the
oldest finished jobs' first (the job stays, its result reads ``gone``)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from ..jobs import JobRecord, JobStatus, live_preview_key, preview_key, result_key


class MemoryRetention:
    _jobs: dict[str, JobRecord]  # every known job (``MemoryBroker``'s)

    def __init__(self, *, result_ttl: float, result_memory_bytes: int) -> None:
        self.ttl = result_ttl
        self.memory_cap = result_memory_bytes
        self._finished: OrderedDict[str, JobRecord] = OrderedDict()  # by finish time
        self._finished_of: dict[str | None, int] = {}  # owner -> how many of _finished
        self._blobs: dict[str, bytes] = {}
        self._result_bytes = 0  # the bytes of the result images (``img:`` keys) in _blobs

    def now(self) -> float:
        raise NotImplementedError  # the broker's clock (``MemoryBroker.now``)

    async def put_blob(self, key: str, data: bytes) -> None:
        self._blobs[key] = data  # partial images: forgotten with their job

    async def put_attempt_blob(self, job_id: str, attempt: int, key: str, data: bytes) -> bool:
        stored = self._jobs.get(job_id)
        if stored is None or stored.attempt != attempt or stored.status is not JobStatus.RUNNING:
            return False
        self._blobs[key] = data
        return True

    async def get_blob(self, key: str) -> bytes | None:
        return self._blobs.get(key)

    async def take_blob(self, key: str, job: JobRecord | None = None, fields: dict[str, Any] | None = None) -> bytes | None:
        data = self._blobs.pop(key, None)
        if data is None:
            return None
        if key.startswith("img:"):
            self._result_bytes -= len(data)
        if job is not None and fields:
            await self.update(job, fields)  # no await point before it: the same step
        return data

    async def update(self, job: JobRecord, fields: dict[str, Any], *, attempt: int | None = None) -> bool:
        raise NotImplementedError  # the broker's (``MemoryBroker.update``)

    def _evict(self, now: float | None = None) -> None:
        """Forget expired jobs; trim result bytes over the memory cap, oldest first."""
        now = self.now() if now is None else now
        while self._finished:
            job_id, job = next(iter(self._finished.items()))
            if job.finished_at is not None and now - job.finished_at < self.ttl:
                break
            self._finished.popitem(last=False)
            if (left := self._finished_of.pop(job.owner, 1) - 1) > 0:
                self._finished_of[job.owner] = left
            self._jobs.pop(job_id, None)
            previews = (*(preview_key(job_id, k) for k in range(job.previews)), live_preview_key(job_id))
            for key in (*job.inputs, *previews, *(result_key(job_id, r.index) for r in job.results)):
                self._drop(key)
        if self._result_bytes > self.memory_cap:
            for job in self._finished.values():
                for r in job.results:
                    if self._drop(result_key(job.id, r.index)):
                        r.gone = "evicted: the server's result memory (queue.result_memory_mib) was full"
                if self._result_bytes <= self.memory_cap:
                    break

    def _drop(self, key: str) -> bool:
        data = self._blobs.pop(key, None)
        if data is not None and key.startswith("img:"):
            self._result_bytes -= len(data)
        return data is not None

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.ttl / 4))
            self._evict()
