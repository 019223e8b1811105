"""Per-model priority queue, fair between keys, with O(log n) positions and forecast
sums (the memory broker's).

Lower priority first.  Within a priority (a *level*) every fair-share key (a job's
``share``: its owner's key id, one id for anonymous callers; one shared id for all
under ``queue.fairness: "fifo"``) has a *lane*, its own jobs in their order
(``lanes.Lane``), and the lanes take turns, weighted: a weighted round-robin by
virtual time.  A key's turn costs ``stride = STRIDE // weight``; a lane's ``base``
is the virtual time it has been served up to, so its n-th waiting job has the tag
``base + n * stride``.  The next job is the head with the smallest tag, ties to the
lane that opened first (``since``).  Taking a job moves its lane's ``base`` on by a
stride and the level's clock to the head's tag; a lane that opens (a key with
nothing waiting at the level) starts at the clock, so a key earns no credit for
being away, and a burst of one key waits its turns like everyone else.  With equal
weights that is plain round-robin; weights 3:1 take three jobs to one.

Positions follow the same rule, without scanning: a job that is its lane's n-th
runs after, of every other lane, the jobs whose tag is lower (or equal, for a lane
that opened earlier): a count from the two lanes' ``base`` and ``stride``, whose
sum is that lane's prefix sum (``Lane.first``).  So the cost ahead of a job is its
own lane's prefix, one prefix per other lane of its level (keys are few, jobs
many) and the totals of the levels before it.

Moves: a job to the front or the back of its own lane (the owner's reorder);
``first``: to the front of its lane with the lane's turn next (an admin's "front of
the priority", and a re-run after a release or a lost lease).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterator

import numpy as np
from sortedcontainers import SortedDict

from .features import DIM, WIDTH
from .lanes import Job, Lane

__all__ = ["STRIDE", "Job", "ModelQueue"]

STRIDE = 720720  # a turn of weight 1 (the lcm of 1..16: exact strides for those weights)


class _Share:
    """A key's lane in a level and where it stands in the round-robin."""

    __slots__ = ("base", "lane", "since", "stride")

    def __init__(self, base: int, stride: int, since: int) -> None:
        self.lane = Lane()
        self.base = base
        self.stride = stride
        self.since = since

    def tag(self, n: int) -> int:
        return self.base + n * self.stride


class _Level:
    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.shares: dict[str, _Share] = {}
        self.clock = 0  # virtual time: the tag of the last head taken
        self.opened = 0  # lanes opened so far (their ``since``)
        self.live = 0

    def push(self, job: Job) -> None:
        share = self.shares.get(job.share)
        if share is None:
            share = self.shares[job.share] = _Share(self.clock, STRIDE // job.weight, self.opened)
            self.opened += 1
        share.lane.push(job)
        self.live += 1

    def head(self) -> Job | None:
        best = min(self.shares.values(), key=lambda s: (s.tag(1), s.since), default=None)
        return best.lane.head() if best is not None else None

    def remove(self, job: Job, *, charge: bool, lead: bool) -> None:
        """Out of its lane; ``charge``: it was taken to run (its lane's turn is used);
        ``lead``: it was the level's head (the clock moves to its tag)."""
        share = self.shares[job.share]
        if lead:
            self.clock = share.tag(1)
        if charge:
            share.base += share.stride
        share.lane.remove(job)
        self.live -= 1
        if share.lane.live == 0:
            del self.shares[job.share]

    def move(self, job: Job, *, front: bool, first: bool) -> None:
        share = self.shares[job.share]
        share.lane.move(job, front or first)
        if first:  # its tag just below every other head's: its lane goes next
            others = [s.tag(1) for s in self.shares.values() if s is not share]
            if others:
                share.base = min(share.base, min(others) - 1 - share.stride)

    def ahead(self, job: Job) -> np.ndarray:
        share = self.shares[job.share]
        out = share.lane.ahead(job)
        tag = share.tag(int(round(out[DIM])) + 1)
        for other in self.shares.values():
            if other is not share:
                n = (tag - other.base - (0 if other.since < share.since else 1)) // other.stride
                out = out + other.lane.first(min(max(n, 0), other.lane.live))
        return out

    @property
    def total(self) -> np.ndarray:
        out = np.zeros(WIDTH, dtype=np.float64)
        for share in self.shares.values():
            out += share.lane.total
        return out

    def order(self) -> Iterator[Job]:
        """The waiting jobs in run order (a merge of the lanes by tag)."""
        heap: list[tuple[int, int, int, Iterator[Job], _Share]] = []
        for share in self.shares.values():
            heap.append((share.tag(1), share.since, 1, iter(share.lane.waiting()), share))
        heapq.heapify(heap)
        while heap:
            tag, since, n, jobs, share = heap[0]
            job = next(jobs, None)
            if job is None:
                heapq.heappop(heap)
                continue
            heapq.heapreplace(heap, (share.tag(n + 1), since, n + 1, jobs, share))
            yield job


class ModelQueue:
    """Waiting jobs of one model; ``get`` is awaited by that model's workers."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._levels: SortedDict = SortedDict()  # priority -> _Level
        self._size = 0
        self._ready = asyncio.Event()
        self._closed = False
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
            level = self._levels[job.priority] = _Level(job.priority)
        level.push(job)
        self.entries[job.id] = job
        self._size += 1
        self._ready.set()

    def push_front(self, job: Job) -> None:
        """Queue ``job`` first of its priority: its lane's front, its lane's turn next (a re-run)."""
        self.push(job)
        self._levels[job.priority].move(job, front=True, first=True)

    def move(self, job: Job, *, front: bool, first: bool = False) -> bool:
        """A waiting job to the front or the back of its key's jobs; ``first``: the
        front of its priority (its key's turn next).  False if it does not wait here."""
        level = self._level_of(job)
        if level is None:
            return False
        level.move(job, front=front, first=first)
        return True

    def remove(self, job: Job, *, charge: bool = False) -> bool:
        """Take a waiting job out (cancel; ``charge``: claimed, its key's turn used,
        and when it is the head the level's clock moves on).  False if it is not in
        this queue."""
        level = self._level_of(job)
        if level is None:
            return False
        level.remove(job, charge=charge, lead=charge and job is level.head())
        del self.entries[job.id]
        self._size -= 1
        if level.live == 0:
            del self._levels[level.priority]
        return True

    def _level_of(self, job: Job) -> _Level | None:
        level = self._levels.get(job.priority)
        if job.lane is None or level is None or self.entries.get(job.id) is not job:
            return None
        return level

    def head(self) -> Job | None:
        return self._levels.peekitem(0)[1].head() if self._levels else None

    def pop_nowait(self) -> Job | None:
        job = self.head()
        if job is not None:
            self.remove(job, charge=True)
        return job

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
        level = self._level_of(job)
        if level is None:
            return np.zeros(WIDTH, dtype=np.float64)
        out = level.ahead(job)
        for priority in self._levels.irange(maximum=level.priority, inclusive=(True, False)):
            out = out + self._levels[priority].total
        return out

    def total(self, priority: int | None = None) -> np.ndarray:
        """Summed vectors of every waiting job (of priority <= ``priority``: what a new
        job of that priority would at most queue behind)."""
        out = np.zeros(WIDTH, dtype=np.float64)
        for p in self._levels.irange(maximum=priority):
            out += self._levels[p].total
        return out

    def jobs(self, limit: int | None = None) -> list[Job]:
        """Waiting jobs in run order (O(limit log keys), for listings)."""
        out: list[Job] = []
        for level in self._levels.values():
            for j in level.order():
                out.append(j)
                if limit is not None and len(out) >= limit:
                    return out
        return out

    def drain(self) -> list[Job]:
        out = self.jobs()
        for job in out:
            self.remove(job)
        return out
