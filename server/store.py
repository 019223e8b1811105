"""Job store: every job by id (O(1) lookup) and the retention of finished results.

Finished jobs are kept for ``result_ttl_seconds``; when the encoded images of
finished jobs exceed ``result_memory_mib`` the oldest results are dropped first
(their status stays, with the images marked as evicted).  The store and the
per-model queues are the only state a Redis-backed implementation would replace.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .jobs import Job


class JobStore:
    def __init__(self, ttl_seconds: float, memory_bytes: int) -> None:
        self.ttl = ttl_seconds
        self.memory_cap = memory_bytes
        self._jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()  # by finish time
        self.result_bytes = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def finished(self, job: Job) -> None:
        """Call once when ``job`` reaches a final state."""
        self._finished[job.id] = job
        self.result_bytes += job.result_bytes()
        self.evict()

    def recent(self, limit: int) -> list[Job]:
        out: list[Job] = []
        for job_id in reversed(self._finished):
            out.append(self._finished[job_id])
            if len(out) >= limit:
                break
        return out

    def drop_image(self, job: Job, index: int) -> None:
        data = job.results[index].data
        if data is not None:
            job.results[index].data = None
            if job.id in self._finished:
                self.result_bytes -= len(data)

    def evict(self, now: float | None = None) -> int:
        """Forget expired jobs and trim results over the memory cap; returns jobs forgotten."""
        now = time.time() if now is None else now
        forgotten = 0
        while self._finished:
            job_id, job = next(iter(self._finished.items()))
            if job.finished_at is not None and now - job.finished_at < self.ttl:
                break
            self._finished.popitem(last=False)
            self._jobs.pop(job_id, None)
            self.result_bytes -= job.result_bytes()
            forgotten += 1
        if self.result_bytes > self.memory_cap:
            for job in self._finished.values():
                for i, r in enumerate(job.results):
                    if r.data is not None:
                        self.drop_image(job, i)
                        job.extra["evicted"] = True
                if self.result_bytes <= self.memory_cap:
                    break
        return forgotten
