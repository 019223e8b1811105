"""The memory broker: everything in this process (the embedded default).

Jobs are records in a dict, each model's waiting jobs a ``queue.ModelQueue``
(O(log n) position and cost ahead), result bytes a dict capped at
``result_memory_bytes`` (the oldest finished jobs' images go first).  Nothing
survives a restart; no other process shares it, so leases, presence deadlines and
the reaper have nothing to do.  The worker's record is the stored object itself:
``update`` and ``finish`` set its fields and wake its waiters.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from typing import Any

import numpy as np

from ..features import DIM, job_vector
from ..jobs import PENDING, JobRecord, JobStatus, live_preview_key, preview_key
from ..queue import Job as Entry
from ..queue import ModelQueue
from .base import ALL, Admission, BatchPlan, QueueFullError, Standing, SubmitKey, WorkerInfo
from .memory_accounts import Accounts
from .memory_retention import MemoryRetention
from .memory_stats import MemoryStatistics
from .notify import LocalEvents

PROGRESS_FIELDS = frozenset(("step", "first_step_at", "last_step_at", "extra", "followed_until", "preview_seq", "preview_step", "preview_wanted_until"))


class MemoryBroker(LocalEvents, MemoryStatistics, MemoryRetention):
    name = "memory"
    distributed = False

    def __init__(self, *, result_ttl: float, result_memory_bytes: int) -> None:
        LocalEvents.__init__(self)
        MemoryStatistics.__init__(self)
        MemoryRetention.__init__(self, result_ttl=result_ttl, result_memory_bytes=result_memory_bytes)
        self._jobs: dict[str, JobRecord] = {}
        self._queues: dict[str, ModelQueue] = {}
        self._running: dict[str, dict[str, JobRecord]] = {}  # model -> id -> record
        self._seq = 0
        self._cancel_asked: set[str] = set()  # running jobs whose cancel was asked
        self._workers: dict[tuple[str, str], WorkerInfo] = {}
        self._outbox: dict[str, float] = {}  # job -> when its delivery is due (the delivery outbox)
        self._submits: dict[str, tuple[str, str, float]] = {}  # idempotency key -> (job, fingerprint, expiry)
        self._accounts = Accounts()  # quotas: each owner's unfinished jobs and GPU-second bookings
        self._paused: set[str] = set()  # paused queues: model names, ALL for every one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._janitor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._janitor = asyncio.create_task(self._expire_loop())

    async def ping(self) -> None:
        return None  # this process: it answers while the process does

    async def close(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        for q in self._queues.values():
            q.close()

    def now(self) -> float:
        return time.time()

    def _queue(self, model: str) -> ModelQueue:
        q = self._queues.get(model)
        if q is None:
            q = self._queues[model] = ModelQueue(capacity=2**62)  # capacity is checked per submit
            self._running[model] = {}
            q.held = bool(self._paused & {model, ALL})
        return q

    # ----- queue ---------------------------------------------------------------------

    async def submit(
        self, job: JobRecord, blobs: dict[str, bytes], capacity: int, idempotency: SubmitKey | None = None,
        admission: Admission | None = None,
    ) -> tuple[str, str] | None:  # fmt: skip
        # one step: no await from the first check to the last write (concurrent submits of
        # this process cannot both pass a check that only one of them should)
        if job.id in self._jobs:
            return None  # submitted already
        if idempotency is not None and (held := self._submitted(idempotency.key)) is not None:
            return held
        q = self._queue(job.model)
        if len(q) >= capacity:
            raise QueueFullError(len(q))
        if admission is not None:
            self._accounts.admit(admission, job.id, self.now())
        self._seq += 1
        job.seq = self._seq
        job.created_at = job.created_at or self.now()
        job.status = JobStatus.WAITING
        self._blobs.update(blobs)
        self._jobs[job.id] = job
        q.push(_entry(job))
        self.saw_submit(job.model)
        if idempotency is not None:
            self._remember(idempotency, job.id)
        return None

    async def claim(self, model: str, worker: str, lease: float, timeout: float) -> JobRecord | None:
        q = self._queue(model)
        entry = await q.get(timeout)
        if entry is None:
            return None
        self.claimed(model, len(q))
        return self._running_now(model, self._jobs[entry.id], worker)

    async def claim_batch(self, model: str, worker: str, lease: float, plan: BatchPlan) -> list[JobRecord]:
        q = self._queue(model)
        if q.held:  # paused
            return []
        heads = q.jobs(1)
        if not heads or heads[0].id != plan.head:
            return []
        key = self._jobs[plan.head].batch
        taken = [q.entries[i] for i in plan.ids if i in q.entries and key and self._jobs[i].batch == key]
        if taken and taken[-1].id not in plan.window:
            return []
        seen = plan.window[: plan.window.index(taken[-1].id)] if taken else []
        if taken and int(q.ahead(taken[-1])[DIM]) != sum(1 for i in seen if i in q.entries):
            return []  # a job the plan did not see came ahead of one it takes
        jobs, now = [], self.now()  # one start: the jobs of a batch leave the model together (standing.running_ahead)
        for entry in (heads[0], *taken):
            q.remove(entry, charge=True)  # every job taken uses a turn of its key
            jobs.append(self._running_now(model, self._jobs[entry.id], worker, now))
        return jobs

    def _running_now(self, model: str, job: JobRecord, worker: str, now: float | None = None) -> JobRecord:
        job.status = JobStatus.RUNNING
        job.attempt += 1
        job.worker = worker
        job.started_at = self.now() if now is None else now
        self._running[model][job.id] = job
        self.notifier.changed(job.id)
        return job

    async def pause(self, model: str, paused: bool) -> None:
        if paused:
            self._paused.add(model)
        else:
            self._paused.discard(model)
        for name, q in self._queues.items():
            if q.held != bool(self._paused & {name, ALL}):
                q.hold(not q.held)  # (a claim waiting on it wakes)
        self.pauses_changed()

    async def paused(self) -> set[str]:
        return set(self._paused)

    async def standing(self, job: JobRecord | None, model: str) -> Standing:
        q = self._queue(model)
        running = list(self._running[model].values())
        if job is None:
            return Standing(running=running, ahead=q.total())
        entry = q.entries.get(job.id)
        ahead = q.ahead(entry) if entry is not None else q.total(job.priority)  # not queued: as if it were now
        return Standing(running=running, ahead=ahead)

    async def move(self, job_id: str, front: bool, first: bool = False) -> bool:
        job = self._jobs.get(job_id)
        if job is None or job.status is not JobStatus.WAITING:
            return False
        q = self._queue(job.model)
        entry = q.entries.get(job_id)
        if entry is None or not q.move(entry, front=front, first=first):
            return False
        self.notifier.changed(job_id)
        return True

    async def depth(self, model: str) -> tuple[int, int]:
        return len(self._queue(model)), len(self._running[model])

    async def waiting(self, model: str, limit: int) -> list[JobRecord]:
        return [self._jobs[e.id] for e in self._queue(model).jobs(limit)]

    async def running(self, model: str) -> list[JobRecord]:
        self._queue(model)
        return sorted(self._running[model].values(), key=lambda j: j.seq)

    # ----- store ---------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        return self._jobs.get(job_id)

    async def recent(self, limit: int, before: tuple[float, str] | None = None) -> list[JobRecord]:
        def order(job: JobRecord) -> tuple[float, str]:
            return (job.finished_at or 0.0, job.id)

        jobs = self._finished.values()
        return heapq.nlargest(limit, (j for j in jobs if before is None or order(j) < before), key=order)

    async def finished_count(self) -> int:
        return len(self._finished)

    async def finished_of(self, owner: str | None) -> int:
        return self._finished_of.get(owner, 0)

    async def jobs_of_task(self, task: str) -> list[JobRecord]:
        return sorted((j for j in self._jobs.values() if j.task == task), key=lambda j: j.seq)

    def _current(self, job: JobRecord, attempt: int | None) -> JobRecord | None:
        stored = self._jobs.get(job.id)
        if stored is None:
            return None
        if attempt is not None and (stored.attempt != attempt or stored.status.finished):
            return None
        return stored

    async def update(self, job: JobRecord, fields: dict[str, Any], *, attempt: int | None = None) -> bool:
        stored = self._current(job, attempt)
        if stored is None:
            return False
        for key, value in fields.items():
            setattr(stored, key, value)
            if job is not stored:
                setattr(job, key, value)
        self.notifier.changed(job.id, progress_only=PROGRESS_FIELDS.issuperset(fields))
        return True

    def progress_threadsafe(self, job: JobRecord) -> None:
        # the worker's record is the stored one: only followers need waking, and only
        # they cost the pipeline thread a hand-off to the loop
        if self._loop is not None and self.notifier.followed(job.id):
            self._loop.call_soon_threadsafe(self.notifier.changed_progress, job.id)

    async def finish(
        self,
        job: JobRecord,
        status: JobStatus,
        fields: dict[str, Any],
        *,
        attempt: int | None,
        blobs: dict[str, bytes],
        only_waiting: bool = False,
    ) -> bool:
        stored = self._current(job, attempt)
        if stored is None or stored.status.finished or (only_waiting and stored.status is not JobStatus.WAITING):
            return False
        self._blobs.update(blobs)
        self._result_bytes += sum(len(b) for b in blobs.values())
        for key, value in fields.items():
            setattr(stored, key, value)
        stored.status = status
        stored.finished_at = self.now()
        q = self._queue(stored.model)
        entry = q.entries.get(stored.id)
        if entry is not None:
            q.remove(entry)
        self._running[stored.model].pop(stored.id, None)
        self._cancel_asked.discard(stored.id)
        self._finished[stored.id] = stored
        self._accounts.release(stored)
        self._finished_of[stored.owner] = self._finished_of.get(stored.owner, 0) + 1
        if stored.webhook == PENDING or (stored.upload_urls and status is JobStatus.DONE):
            self._outbox.setdefault(stored.id, stored.finished_at)
        self._evict()
        self.notifier.changed(stored.id)
        return True

    async def release(self, job: JobRecord, attempt: int) -> bool:
        stored = self._current(job, attempt)
        if stored is None or stored.status is not JobStatus.RUNNING:
            return False
        self._running[stored.model].pop(stored.id, None)
        stored.status = JobStatus.WAITING  # what lua/queue.lua's requeue resets too
        stored.worker = None
        stored.step = 0
        stored.first_step_at = stored.last_step_at = None
        for key in (*(preview_key(stored.id, k) for k in range(stored.previews)), live_preview_key(stored.id)):
            self._drop(key)  # the lost attempt's previews go with it (its re-run makes its own)
        stored.previews = stored.preview_seq = stored.preview_step = 0
        self._queue(stored.model).push_front(_entry(stored))
        self.notifier.changed(stored.id)
        return True

    async def cancel(self, job_id: str, message: str) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None or job.status.finished:
            return job
        if job.status is JobStatus.WAITING:
            await self.finish(job, JobStatus.CANCELLED, {"message": message}, attempt=None, blobs={})
        else:
            self._cancel_asked.add(job_id)
            for callback in self.cancel_callbacks:
                callback(job_id)
        return job

    async def clear(self, message: str) -> int:
        count = 0
        for q in self._queues.values():
            for entry in q.jobs():
                await self.cancel(entry.id, message)
                count += 1
        return count

    # ----- events --------------------------------------------------------------------

    async def claim_deliveries(self, lease: float, limit: int, job_id: str | None = None) -> list[str]:
        now = self.now()
        ids = [job_id] if job_id is not None else list(self._outbox)
        due = [i for i in ids if self._outbox.get(i, now + 1) <= now][:limit]
        for i in due:
            self._outbox[i] = now + lease
        return due

    async def end_delivery(self, job_id: str, fields: dict[str, Any], retry_in: float | None = None) -> None:
        if retry_in is None:
            self._outbox.pop(job_id, None)
        elif job_id in self._outbox:
            self._outbox[job_id] = self.now() + retry_in
        stored = self._jobs.get(job_id)
        if stored is not None and fields:
            await self.update(stored, fields)

    async def command(self, model: str, action: str) -> None:
        for callback in self.command_callbacks:
            callback(model, action)

    # ----- workers -------------------------------------------------------------------

    async def heartbeat(self, infos: list[WorkerInfo], running: list[tuple[str, int]], lease: float) -> set[str]:
        now = self.now()
        for info in infos:
            info.seen_at = now
            self._workers[(info.worker, info.model)] = info
        return {
            job_id for job_id, attempt in running
            if job_id in self._cancel_asked or self._current(_probe(job_id), attempt) is None
        }  # fmt: skip

    async def leave(self, worker: str) -> None:
        for key in [k for k in self._workers if k[0] == worker]:
            del self._workers[key]

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        return [w for w in self._workers.values() if model is None or w.model == model]

    async def reap(self) -> int:
        return 0  # one process: no lease can outlive its worker

    # ----- idempotent submits and quotas ------------------------------------------------

    def _remember(self, idem: SubmitKey, job_id: str) -> None:
        now = self.now()
        self._submits[idem.key] = (job_id, idem.fingerprint, now + idem.ttl)
        if len(self._submits) > 2 * len(self._jobs) + 1024:  # forget expired keys now and then
            self._submits = {k: v for k, v in self._submits.items() if v[2] > now}

    def _submitted(self, key: str) -> tuple[str, str] | None:
        kept = self._submits.get(key)
        if kept is None or kept[2] <= self.now() or kept[0] not in self._jobs:
            return None
        return kept[0], kept[1]

    async def submitted(self, key: str) -> tuple[str, str] | None:
        return self._submitted(key)

    async def ledger(self, owner: str) -> tuple[list[str], list[tuple[str, float, float, bool]]]:
        return self._accounts.ledger(owner)


def _entry(job: JobRecord) -> Entry:
    return Entry(job.id, job.priority, job.seq, job_vector(job.task, np.asarray(job.features), job.batch), job.share, job.weight)


def _probe(job_id: str) -> JobRecord:
    return JobRecord(model="", task="", id=job_id)
