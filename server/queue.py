"""Per-model priority queue with O(log n) positions and forecast sums (the memory broker's).

Jobs are ordered by ``(priority, seq)``: lower priority first, FIFO within a
priority.  Each distinct priority is a *level* holding its jobs in arrival order.
A job's forecast vector ends with a count of one, so summing the vectors of the
jobs ahead of a job gives both its position and the forecast features of what it
waits for.  A level keeps prefix sums of the vectors in arrival order and subtracts
the jobs that left: those popped from the front as one running sum (each was ahead
of every job still waiting), those cancelled from the middle through a Fenwick
(binary indexed) tree.  Push and pop cost one vector add, a cancel and a position
O(log n); the jobs ahead in lower levels are their levels' totals.  Nothing scans
the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
from sortedcontainers import SortedDict

from .features import WIDTH

MIN_SLOTS = 64


class Job:
    """A queue entry: a waiting job's id, order and forecast vector."""

    __slots__ = ("id", "level", "priority", "seq", "slot", "vector")

    def __init__(self, job_id: str, priority: int, seq: int, vector: np.ndarray) -> None:
        self.id = job_id
        self.priority = priority
        self.seq = seq
        self.vector = vector
        self.level: _Level | None = None
        self.slot = -1


class _Fenwick:
    def __init__(self, capacity: int) -> None:
        self.tree = np.zeros((capacity + 1, WIDTH), dtype=np.float64)

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
        self.jobs: deque[Job] = deque()  # arrival order; cancelled jobs are skipped lazily
        self.live = 0
        self.next_slot = 0
        self.cum = np.zeros((MIN_SLOTS + 1, WIDTH), dtype=np.float64)  # cum[k]: sum of slots [0, k)
        self.popped = np.zeros(WIDTH, dtype=np.float64)  # jobs taken from the front
        self.cancelled: _Fenwick | None = None  # jobs taken from anywhere else (made at the first)

    def push(self, job: Job) -> None:
        if self.next_slot + 1 >= self.cum.shape[0]:
            self._compact()
        assert job.vector is not None
        slot = self.next_slot
        np.add(self.cum[slot], job.vector, out=self.cum[slot + 1])
        job.level = self
        job.slot = slot
        self.next_slot = slot + 1
        self.jobs.append(job)
        self.live += 1

    def pop(self) -> Job | None:
        while self.jobs:
            job = self.jobs.popleft()
            if job.level is self:
                self.popped += job.vector
                self._left(job)
                return job
        return None

    def remove(self, job: Job) -> None:
        if self.cancelled is None:
            self.cancelled = _Fenwick(self.cum.shape[0] - 1)
        assert job.vector is not None
        self.cancelled.add(job.slot, job.vector)
        self._left(job)

    def _left(self, job: Job) -> None:
        job.level = None
        job.slot = -1
        self.live -= 1
        if self.live == 0:  # start afresh: drops lazily skipped entries and float drift
            self.jobs.clear()
            self.next_slot = 0
            self.popped[:] = 0
            self.cancelled = None

    def ahead(self, job: Job) -> np.ndarray:
        """Summed vectors of the jobs of this level ahead of ``job``."""
        out = self.cum[job.slot] - self.popped
        if self.cancelled is not None:
            out -= self.cancelled.prefix(job.slot)
        return out

    @property
    def total(self) -> np.ndarray:
        out = self.cum[self.next_slot] - self.popped
        if self.cancelled is not None:
            out -= self.cancelled.prefix(self.next_slot)
        return out

    def _compact(self) -> None:
        """Renumber the waiting jobs from slot 0, with room for as many again."""
        live = [j for j in self.jobs if j.level is self]
        self.cum = np.zeros((max(MIN_SLOTS, 2 * len(live) + 2) + 1, WIDTH), dtype=np.float64)
        self.jobs = deque()
        self.next_slot = 0
        self.live = 0
        self.popped[:] = 0
        self.cancelled = None
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
        self._spare: _Level | None = None  # an emptied level, reused (a queue often runs empty)
        self.entries: dict[str, Job] = {}  # waiting jobs by id
        self.held = False  # paused: ``get`` hands out nothing (jobs still queue)

    def __len__(self) -> int:
        return self._size

    @property
    def full(self) -> bool:
        return self._size >= self.capacity

    def push(self, job: Job) -> None:
        level = self._levels.get(job.priority)
        if level is None:
            level, self._spare = self._spare or _Level(job.priority), None
            level.priority = job.priority
            self._levels[job.priority] = level
        level.push(job)
        self.entries[job.id] = job
        self._size += 1
        self._ready.set()

    def push_front(self, job: Job) -> None:
        """Queue ``job`` ahead of every job of its priority (a re-run; O(n) in its level)."""
        level = self._levels.get(job.priority)
        behind = [j for j in level.jobs if j.level is level] if level is not None else []
        for j in behind:
            self.remove(j)
        self.push(job)
        for j in behind:
            self.push(j)

    def remove(self, job: Job) -> bool:
        """Take a waiting job out (cancel). False if it is not in this queue."""
        level = job.level
        if level is None or self._levels.get(level.priority) is not level:
            return False
        level.remove(job)
        del self.entries[job.id]
        self._size -= 1
        if level.live == 0:
            self._retire(level)
        return True

    def pop_nowait(self) -> Job | None:
        while self._levels:
            priority, level = self._levels.peekitem(0)
            job = level.pop()
            if level.live == 0:
                self._retire(level)
            if job is not None:
                del self.entries[job.id]
                self._size -= 1
                return job
        return None

    def _retire(self, level: _Level) -> None:
        del self._levels[level.priority]
        self._spare = level

    async def get(self, timeout: float | None = None) -> Job | None:
        """Next job, waiting up to ``timeout`` seconds for one; None once the queue is
        closed or when none came."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._closed:
                return None
            job = None if self.held else self.pop_nowait()
            if job is not None:
                return job
            self._ready.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ready.wait()
            except TimeoutError:
                return None

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def hold(self, held: bool) -> None:
        """Pause (``get`` waits as if the queue were empty) or resume (wakes it)."""
        self.held = held
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

    def total(self, priority: int | None = None) -> np.ndarray:
        """Summed vectors of every waiting job (of priority <= ``priority``: what a new
        job of that priority would queue behind)."""
        out = np.zeros(WIDTH, dtype=np.float64)
        for p in self._levels.irange(maximum=priority):
            out += self._levels[p].total
        return out

    def jobs(self, limit: int | None = None) -> list[Job]:
        """Waiting jobs in run order (O(limit), for listings)."""
        out: list[Job] = []
        for level in self._levels.values():
            for j in level.jobs:
                if j.level is level:
                    out.append(j)
                    if limit is not None and len(out) >= limit:
                        return out
        return out

    def drain(self) -> list[Job]:
        out = self.jobs()
        for job in out:
            self.remove(job)
        return out
