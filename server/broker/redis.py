"""The Redis broker: any number of API nodes and worker hosts on one Redis.

The job hash is the truth; the events stream ``ev`` is only a hint that wakes
waiters, who re-read the record.  Every change that touches more than one key is
one Lua script (``redis_scripts``); key names are in ``keys``.  Times inside the
scripts are Redis ``TIME``; ``now()`` is this host's clock moved by the offset to
it (measured at start, refreshed by every heartbeat and reap).

Every connection failure surfaces as ``BrokerUnavailable``; the events reader and
the progress writers survive a Redis restart (they retry with a backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

import msgspec
import numpy as np

from ..features import WIDTH
from ..jobs import FIELDS, JobRecord, JobStatus
from .base import Admission, BatchPlan, QueueFullError, QuotaRefused, Standing, SubmitKey, SubmitUnknown
from .redis_accounts import RedisAccounts
from .redis_codec import (
    CLAIM_POLL,
    ERRORS,
    LEVEL_SHIFT,
    PAGE,
    PROGRESS_FIELDS,
    decode_record,
    encode_fields,
    field_pairs,
    floats,
    guarded,
    to_json,
    vector_text,
)
from .redis_events import RedisEvents

log = logging.getLogger(__name__)


class RedisBroker(RedisEvents, RedisAccounts):
    """The queue, the job store and the deliveries (the events: ``redis_events``;
    presence, statistics and the ledger: ``redis_accounts``)."""

    @guarded
    async def submit(
        self, job: JobRecord, blobs: dict[str, bytes], capacity: int, idempotency: SubmitKey | None = None,
        admission: Admission | None = None,
    ) -> tuple[str, str] | None:  # fmt: skip
        job.status = JobStatus.WAITING
        names = [f for f in FIELDS if f not in ("seq", "created_at", "status")]
        idem: list[Any] = ["", "", 0]
        if idempotency is not None:
            idem = [idempotency.key, f"{job.id} {idempotency.fingerprint}", max(1, math.ceil(idempotency.ttl))]
        try:
            res = await self._script(
                "submit",
                job.id,
                job.model,
                job.priority + LEVEL_SHIFT,
                vector_text(job),
                capacity,
                job.task,
                repr(float(job.created_at)) if job.created_at else "",
                self._valid_until(),
                *idem,
                _admission_json(admission),
                len(blobs),
                *(x for k, v in blobs.items() for x in (k, v)),
                *encode_fields(job, names),
            )
        except ERRORS as exc:  # sent, perhaps run: settled by now (valid_until), read it back to know
            raise SubmitUnknown(
                f"Redis at {self.address} is not reachable or did not answer ({exc}); the job was queued only if "
                f"GET /api/status?task_id={job.id} finds it (it cannot be queued any more)",
                job.id,
            ) from exc
        code = int(res[0])
        if code == -3:  # reached Redis only after our deadline: nothing was written
            raise SubmitUnknown(f"Redis at {self.address} answered too late; the job was not queued", job.id)
        if code == -2:
            held_id, _, held_fp = res[1].decode().partition(" ")
            return held_id, held_fp
        if code == -4:
            raise QuotaRefused("max_queued", int(res[1]), jobs=[i.decode() for i in res[2:]])
        if code == -5:
            raise QuotaRefused("gpu_seconds_per_hour", float(res[1]), wait=float(res[2]))
        if code < 0:
            raise QueueFullError(int(res[1]))
        job.seq = code
        job.created_at = float(res[1])
        return None

    @guarded
    async def claim(self, model: str, worker: str, lease: float, timeout: float) -> JobRecord | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            wake = asyncio.Event()
            waiters = self._claim_waiters.setdefault(model, set())
            waiters.add(wake)  # registered before the try: a submit in between still wakes us
            try:
                got = await self._script("claim", model, to_json(worker), float(lease), self._valid_until())
                if got:
                    raw, waiting = got
                    self.claimed(model, int(waiting))
                    return decode_record(raw)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(CLAIM_POLL, left))
            finally:
                waiters.discard(wake)
                if not waiters:
                    self._claim_waiters.pop(model, None)

    @guarded
    async def claim_batch(self, model: str, worker: str, lease: float, plan: BatchPlan) -> list[JobRecord]:
        raws = await self._script(
            "claim_batch", model, to_json(worker), float(lease), self._valid_until(), plan.head, len(plan.ids), *plan.ids, *plan.window
        )
        return [job for job in (decode_record(raw) for raw in raws) if job is not None]

    @guarded
    async def standing(self, job: JobRecord | None, model: str) -> Standing:
        level = str(job.priority + LEVEL_SHIFT) if job is not None else ""
        running_raw, totals, prefixes, waits = await self._script("standing", model, job.id if job is not None else "", WIDTH, level)
        running = [r for r in (decode_record(raw) for raw in running_raw) if r is not None]
        running.sort(key=lambda j: j.seq)
        ahead = np.zeros(WIDTH, dtype=np.float64)
        if int(waits):  # (redis_scripts: a lane's popped heads stay in its tree, and are subtracted)
            for lane in totals:
                total, popped = floats(lane).reshape(2, WIDTH)
                ahead += total - popped
            for used_raw, nodes in prefixes:  # the lanes of which only the first jobs are ahead: the entries they use
                used, values = [int(e) for e in used_raw], floats(nodes).reshape(-1, len(used_raw))
                ahead[used] += values[1:].sum(axis=0) - values[0]
        return Standing(running=running, ahead=ahead)

    @guarded
    async def move(self, job_id: str, front: bool, first: bool = False) -> bool:
        return bool(int(await self._script("move", job_id, "1" if front else "0", "1" if first else "0")))

    @guarded
    async def depth(self, model: str) -> tuple[int, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.queue(model))
            pipe.zcard(self.keys.running(model))
            waiting, running = await pipe.execute()
        return int(waiting), int(running)

    @guarded
    async def waiting(self, model: str, limit: int) -> list[JobRecord]:
        if limit <= 0:
            return []
        ids = await self._script("waiting", model, min(limit, 2**31))  # run order: lua/queue.lua's turns
        return [r for _, r in await self._records(ids) if r is not None]

    @guarded
    async def running(self, model: str) -> list[JobRecord]:
        ids = await self._redis.zrange(self.keys.running(model), 0, -1)
        out = [r for _, r in await self._records(ids) if r is not None]
        out.sort(key=lambda j: j.seq)
        return out

    @guarded
    async def get(self, job_id: str) -> JobRecord | None:
        return decode_record(await self._redis.hgetall(self.keys.job(job_id)))

    @guarded
    async def recent(self, limit: int, before: tuple[float, str] | None = None) -> list[JobRecord]:
        out: list[JobRecord] = []
        start = 0
        top = "+inf" if before is None else repr(before[0])  # the done set's score is finished_at
        while len(out) < limit:
            batch = await self._redis.zrevrangebyscore(self.keys.done(), top, "-inf", start=start, num=max(limit, 16), withscores=True)
            if not batch:
                break
            ids = [m.decode() for m, score in batch if before is None or (float(score), m.decode()) < before]
            gone: list[str] = []
            for job_id, rec in await self._records(ids):
                if rec is None:
                    gone.append(job_id)
                elif len(out) < limit:
                    out.append(rec)
            start += len(batch) - len(gone)
            if gone:
                await self._redis.zrem(self.keys.done(), *gone)
        return out

    @guarded
    async def finished_count(self) -> int:
        return await self._count_kept(self.keys.done())

    @guarded
    async def finished_of(self, owner: str | None) -> int:
        return await self._count_kept(self.keys.owner_done(owner))

    async def _count_kept(self, key: str) -> int:
        """The finished jobs in ``key`` (``done`` or ``done:{owner}``) whose records are kept."""
        async with self._redis.pipeline(transaction=False) as pipe:  # the expired ones go first (their records are gone)
            pipe.zremrangebyscore(key, "-inf", repr(self.now() - self.ttl))
            pipe.zcard(key)
            _, count = await pipe.execute()
        return int(count)

    @guarded
    async def jobs_of_task(self, task: str) -> list[JobRecord]:
        key = self.keys.task(task)
        out: list[JobRecord] = []
        cursor = 0
        while True:
            cursor, ids = await self._redis.sscan(key, cursor, count=PAGE)
            gone: list[str] = []
            for job_id, rec in await self._records(ids):
                if rec is None:
                    gone.append(job_id)
                else:
                    out.append(rec)
            if gone:
                await self._redis.srem(key, *gone)
            if int(cursor) == 0:
                break
        uniq = {r.id: r for r in out}  # SSCAN may return an id twice
        return sorted(uniq.values(), key=lambda j: j.seq)

    @guarded
    async def update(self, job: JobRecord, fields: dict[str, Any], *, attempt: int | None = None) -> bool:
        return await self._update(job, fields, attempt)

    async def _update(self, job: JobRecord, fields: dict[str, Any], attempt: int | None) -> bool:
        pairs = field_pairs(fields)
        kind = "progress" if PROGRESS_FIELDS.issuperset(fields) else "change"
        ok = await self._script("update", job.id, "" if attempt is None else str(attempt), kind, *pairs)
        if int(ok):
            for name, value in fields.items():
                setattr(job, name, value)
            return True
        return False

    @guarded
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
        ttl = self._ttl_seconds()
        fields = {k: v for k, v in fields.items() if k not in ("status", "finished_at")}  # the broker sets those
        pairs = field_pairs(fields)
        fence = "waiting" if only_waiting else "" if attempt is None else str(attempt)
        stored = (x for k, v in blobs.items() for x in (k, v))  # written by the script, past the fence only
        if "step" in fields:  # (a job done): its steps not written yet are not needed any more
            self._progress_jobs.pop(job.id, None)
        res = await self._script("finish", job.id, fence, to_json(JobStatus(status)), ttl, len(blobs), *stored, *pairs)
        if not res:
            return False
        for name, value in fields.items():
            setattr(job, name, value)
        job.status = JobStatus(status)
        job.finished_at = float(res)
        return True

    @guarded
    async def release(self, job: JobRecord, attempt: int) -> bool:
        ok = int(await self._script("release", job.id, str(attempt)))
        if ok:
            job.status = JobStatus.WAITING
            job.worker = None
            job.step = 0
            job.first_step_at = job.last_step_at = None
        return bool(ok)

    @guarded
    async def cancel(self, job_id: str, message: str) -> JobRecord | None:
        res = await self._cancel(job_id, message)
        return res[1] if res is not None else None

    async def _cancel(self, job_id: str, message: str) -> tuple[bytes, JobRecord | None] | None:
        res = await self._script("cancel", job_id, to_json(message), self._ttl_seconds())
        if not res:
            return None
        return res[0], decode_record(res[1])

    @guarded
    async def clear(self, message: str) -> int:
        count = 0
        for model in await self._models():
            key = self.keys.queue(model)
            seen: set[str] = set()
            while True:
                ids = [i.decode() for i in await self._redis.zrange(key, 0, PAGE - 1)]
                ids = [i for i in ids if i not in seen]
                if not ids:
                    break
                for job_id in ids:
                    seen.add(job_id)
                    res = await self._cancel(job_id, message)
                    if res is None:  # a ghost: its record is gone
                        await self._redis.zrem(key, job_id)
                    elif res[0] == b'"waiting"':
                        count += 1
        return count

    @guarded
    async def put_blob(self, key: str, data: bytes) -> None:
        await self._redis.set(self.keys.blob(key), data, ex=self._ttl_seconds())

    @guarded
    async def put_attempt_blob(self, job_id: str, attempt: int, key: str, data: bytes) -> bool:
        return bool(int(await self._script("put_attempt_blob", job_id, str(attempt), key, data, self._ttl_seconds())))

    @guarded
    async def get_blob(self, key: str) -> bytes | None:
        data = await self._redis.get(self.keys.blob(key))
        return bytes(data) if data is not None else None

    @guarded
    async def take_blob(self, key: str, job: JobRecord | None = None, fields: dict[str, Any] | None = None) -> bytes | None:
        pairs = field_pairs(fields or {})
        data = await self._script("take_blob", key, job.id if job is not None else "", *pairs)
        if data is None:
            return None
        if job is not None:
            for name, value in (fields or {}).items():
                setattr(job, name, value)
        return bytes(data)

    @guarded
    async def claim_deliveries(self, lease: float, limit: int, job_id: str | None = None) -> list[str]:
        ids = await self._script("claim_deliveries", job_id or "", float(lease), int(limit))
        return [i.decode() for i in ids]

    @guarded
    async def end_delivery(self, job_id: str, fields: dict[str, Any], retry_in: float | None = None) -> None:
        pairs = field_pairs(fields)
        await self._script("end_delivery", job_id, "" if retry_in is None else repr(float(retry_in)), *pairs)


def _admission_json(admission: Admission | None) -> bytes:
    """``admission`` for the submit script: every field that is set (a JSON null would
    be a true value in Lua)."""
    if admission is None:
        return b""
    return msgspec.json.encode({k: v for k, v in msgspec.structs.asdict(admission).items() if v is not None})
