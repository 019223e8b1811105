"""Per-model priority queue with O(log n) positions and forecast sums.

Jobs are ordered by ``(priority, seq)``: lower priority first, FIFO within a
priority.  Each distinct priority is a *level* holding its jobs in arrival order in
a Fenwick (binary indexed) tree of feature vectors, whose last component counts
jobs.  The jobs ahead of a job are all jobs of lower levels (kept as running
totals) plus a Fenwick prefix of its own level, so a job's position and the summed
forecast features of everything ahead cost O(levels + log n), never a scan.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
from sortedcontainers import SortedDict

from .forecast import DIM
from .jobs import Job

WIDTH = DIM + 1  # features + count


class _Fenwick:
    def __init__(self, capacity: int) -> None:
        self.tree = np.zeros((capacity + 1, WIDTH), dtype=np.float64)

    @property
    def capacity(self) -> int:
        return self.tree.shape[0] - 1

    def add(self, slot: int, vec: np.ndarray) -> None:
        i = slot + 1
        n = self.tree.shape[0]
        while i < n:
            self.tree[i] += vec
            i += i & -i

    def prefix(self, slot: int) -> np.ndarray:
        """Sum of slots [0, slot)."""
        out = np.zeros(WIDTH, dtype=np.float64)
        i = slot
        while i > 0:
            out += self.tree[i]
            i -= i & -i
        return out


class _Level:
    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.jobs: deque[Job] = deque()  # arrival order; removed jobs are skipped lazily
        self.live = 0
        self.total = np.zeros(WIDTH, dtype=np.float64)
        self.next_slot = 0
        self.fenwick = _Fenwick(64)

    def push(self, job: Job) -> None:
        if self.next_slot >= self.fenwick.capacity:
            self._rebuild()
        job.level = self
        job.slot = self.next_slot
        self.next_slot += 1
        if job.row is None:  # its features and a count of one
            assert job.vector is not None
            job.row = np.append(job.vector, 1.0)
        row = job.row
        self.fenwick.add(job.slot, row)
        self.total += row
        self.jobs.append(job)
        self.live += 1

    def remove(self, job: Job) -> None:
        row = job.row
        assert row is not None
        self.fenwick.add(job.slot, -row)
        self.total -= row
        self.live -= 1
        job.level = None
        job.slot = -1
        if self.live == 0:  # start afresh: drops lazily skipped entries and float drift
            self.jobs.clear()
            self.total[:] = 0
            self.next_slot = 0
            self.fenwick = _Fenwick(64)

    def pop(self) -> Job | None:
        while self.jobs:
            job = self.jobs.popleft()
            if job.level is self:
                self.remove(job)
                return job
        return None

    def ahead(self, job: Job) -> np.ndarray:
        return self.fenwick.prefix(job.slot)

    def _rebuild(self) -> None:
        live = [j for j in self.jobs if j.level is self]
        capacity = max(64, 2 * len(live) + 2)
        self.fenwick = _Fenwick(capacity)
        self.jobs = deque()
        self.total[:] = 0
        self.next_slot = 0
        self.live = 0
        for j in live:
            self.push(j)


class ModelQueue:
    """Waiting jobs of one model; ``get`` is awaited by that model's workers."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._levels: SortedDict = SortedDict()  # priority -> _Level
        self._size = 0
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return self._size

    @property
    def full(self) -> bool:
        return self._size >= self.capacity

    def push(self, job: Job) -> None:
        level = self._levels.get(job.priority)
        if level is None:
            level = self._levels[job.priority] = _Level(job.priority)
        level.push(job)
        self._size += 1
        self._ready.set()

    def remove(self, job: Job) -> bool:
        """Take a waiting job out (cancel). False if it is not in this queue."""
        level = job.level
        if level is None or self._levels.get(level.priority) is not level:
            return False
        level.remove(job)
        self._size -= 1
        if level.live == 0:
            del self._levels[level.priority]
        return True

    def pop_nowait(self) -> Job | None:
        while self._levels:
            priority, level = self._levels.peekitem(0)
            job = level.pop()
            if level.live == 0:
                del self._levels[priority]
            if job is not None:
                self._size -= 1
                return job
        return None

    async def get(self) -> Job | None:
        """Next job, waiting for one; None once the queue is closed."""
        while True:
            if self._closed:
                return None
            job = self.pop_nowait()
            if job is not None:
                return job
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def ahead(self, job: Job) -> np.ndarray:
        """Summed feature vector (last component: count) of the jobs ahead of ``job``."""
        level = job.level
        if level is None:
            return np.zeros(WIDTH, dtype=np.float64)
        out = level.ahead(job)
        for priority in self._levels.irange(maximum=level.priority, inclusive=(True, False)):
            out = out + self._levels[priority].total
        return out

    def total(self) -> np.ndarray:
        out = np.zeros(WIDTH, dtype=np.float64)
        for level in self._levels.values():
            out += level.total
        return out

    def jobs(self) -> list[Job]:
        """Waiting jobs in run order (O(n), for listings)."""
        return [j for level in self._levels.values() for j in level.jobs if j.level is level]

    def drain(self) -> list[Job]:
        out = self.jobs()
        for job in out:
            self.remove(job)
        return out
