"""One key's waiting jobs within one priority of a model (the memory broker's, for ``queue.py``).

A lane holds its jobs in order (arrival; a re-run or a move to the front goes
first).  A job's forecast vector ends with a count of one, so summing the vectors
of jobs gives both how many they are and the forecast features of what they cost.
The lane keeps prefix sums of the vectors in slot order and subtracts the jobs that
left: those taken from the front as one running sum (each was ahead of every job
still waiting), those taken from the middle through a Fenwick (binary indexed)
tree.  Push and pop cost one vector add; a job's rank and the sum of the first
``n`` jobs cost O(log n).  Nothing scans the lane, except a move to the front,
which renumbers it.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .features import DIM, WIDTH

MIN_SLOTS = 64


class Job:
    """A queue entry: a waiting job's id, order, forecast vector, and its fair-share
    key (``share``) and weight."""

    __slots__ = ("id", "lane", "priority", "seq", "share", "slot", "vector", "weight")

    def __init__(self, job_id: str, priority: int, seq: int, vector: np.ndarray, share: str = "", weight: int = 1) -> None:
        self.id = job_id
        self.priority = priority
        self.seq = seq
        self.vector = vector
        self.share = share
        self.weight = max(1, weight)
        self.lane: Lane | None = None
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

    def kept(self, k: int) -> int:
        """The smallest ``t`` such that slots [0, t) hold ``k`` slots not in the tree
        (a descent on the counts, [DIM])."""
        n = self.tree.shape[0]
        pos, step = 0, 1 << (n - 1).bit_length()
        while step:
            nxt = pos + step
            if nxt < n:
                free = step - int(round(self.tree[nxt][DIM]))
                if free < k:
                    pos, k = nxt, k - free
            step >>= 1
        return pos + 1


class Lane:
    def __init__(self) -> None:
        self.jobs: deque[Job] = deque()  # slot order; jobs taken from the middle are skipped lazily
        self.live = 0
        self.next_slot = 0
        self.cum = np.zeros((MIN_SLOTS + 1, WIDTH), dtype=np.float64)  # cum[k]: sum of slots [0, k)
        self.popped = np.zeros(WIDTH, dtype=np.float64)  # jobs taken from the front
        self.npopped = 0
        self.cancelled: _Fenwick | None = None  # jobs taken from anywhere else (made at the first)

    def push(self, job: Job) -> None:
        if self.next_slot + 1 >= self.cum.shape[0]:
            self._compact()
        slot = self.next_slot
        np.add(self.cum[slot], job.vector, out=self.cum[slot + 1])
        job.lane = self
        job.slot = slot
        self.next_slot = slot + 1
        self.jobs.append(job)
        self.live += 1

    def head(self) -> Job | None:
        while self.jobs and self.jobs[0].lane is not self:
            self.jobs.popleft()
        return self.jobs[0] if self.jobs else None

    def remove(self, job: Job) -> None:
        """Take ``job`` out (the head cheaply, any other through the tree)."""
        if job is self.head():
            self.jobs.popleft()
            self.popped += job.vector
            self.npopped += 1
        else:
            if self.cancelled is None:
                self.cancelled = _Fenwick(self.cum.shape[0] - 1)
            self.cancelled.add(job.slot, job.vector)
        job.lane = None
        job.slot = -1
        self.live -= 1
        if self.live == 0:  # start afresh: drops lazily skipped entries and float drift
            self.jobs.clear()
            self.next_slot = 0
            self.popped[:] = 0
            self.npopped = 0
            self.cancelled = None

    def ahead(self, job: Job) -> np.ndarray:
        """Summed vectors of the jobs of this lane ahead of ``job``."""
        return self._before(job.slot)

    def first(self, n: int) -> np.ndarray:
        """Summed vectors of the first ``n`` waiting jobs (0 <= n <= live)."""
        if n <= 0:
            return np.zeros(WIDTH, dtype=np.float64)
        if n >= self.live:
            return self.total
        k = self.npopped + n  # the slots before the n-th waiting job's end, the taken ones not counted
        end = self.cancelled.kept(k) if self.cancelled is not None else k
        return self._before(end)

    def _before(self, slot: int) -> np.ndarray:
        out = self.cum[slot] - self.popped
        if self.cancelled is not None:
            out -= self.cancelled.prefix(slot)
        return out

    @property
    def total(self) -> np.ndarray:
        return self._before(self.next_slot)

    def waiting(self) -> list[Job]:
        return [j for j in self.jobs if j.lane is self]

    def move(self, job: Job, front: bool) -> None:
        """``job`` (of this lane) to the front or the back: renumbers the lane (O(n))."""
        rest = [j for j in self.waiting() if j is not job]
        self._reset(0)
        for j in [job, *rest] if front else [*rest, job]:
            self.push(j)

    def _compact(self) -> None:
        """Renumber the waiting jobs from slot 0, with room for as many again."""
        live = self.waiting()
        self._reset(max(MIN_SLOTS, 2 * len(live) + 2))
        for j in live:
            self.push(j)

    def _reset(self, slots: int) -> None:
        if slots:
            self.cum = np.zeros((slots + 1, WIDTH), dtype=np.float64)
        self.jobs = deque()
        self.next_slot = 0
        self.live = 0
        self.popped[:] = 0
        self.npopped = 0
        self.cancelled = None
