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
import functools
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, ParamSpec, TypeVar

import msgspec
import numpy as np
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ..forecast import WIDTH, job_vector
from ..jobs import FIELDS, JobRecord, JobStatus
from . import redis_scripts
from .base import BatchPlan, BrokerUnavailable, QueueFullError, Standing, SubmitKey, SubmitUnknown, WorkerInfo
from .keys import Keys
from .notify import LocalEvents

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  # seconds between two progress writes of a job nobody follows (followed: every step)
LEVEL_SHIFT = 2**20  # priority + shift = level (priorities in [-2^20, 2^20))
PROGRESS_FIELDS = frozenset(("step", "first_step_at", "last_step_at", "extra", "followed_until", "preview_seq", "preview_step", "preview_wanted_until"))
LOST_TWICE = "the worker running this job was lost twice (its lease expired); it was not retried again"
CLAIM_POLL = 0.5  # claim retries at least this often (a missed wake-up costs no more)
READ_BLOCK_MS = 1000
READ_COUNT = 1000
REAP_BATCH = 1000
PAGE = 500
_FIELD_SET = frozenset(FIELDS)
_FIELD_BYTES = {f.encode(): f for f in FIELDS}
_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError, OSError)

P = ParamSpec("P")
T = TypeVar("T")


def _guarded(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Connection failures of a broker method raise ``BrokerUnavailable``."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except _ERRORS as exc:
            self = args[0]
            raise BrokerUnavailable(f"Redis at {self.address} is not reachable: {exc}") from exc  # type: ignore[attr-defined]

    return wrapper


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value)


def encode_fields(job: JobRecord, names: Iterable[str] = FIELDS) -> list[Any]:
    """Field/JSON pairs of ``job``, flat (script arguments, HSET)."""
    out: list[Any] = []
    for name in names:
        out.append(name)
        out.append(_json(getattr(job, name)))
    return out


def decode_record(raw: dict[bytes, bytes] | list[bytes] | None) -> JobRecord | None:
    """A job hash (HGETALL, as a dict or a flat list) -> the record; None if empty."""
    if not raw:
        return None
    items: Iterable[tuple[bytes, bytes]]
    if isinstance(raw, dict):
        items = raw.items()
    else:
        items = zip(raw[0::2], raw[1::2], strict=True)
    parts = [b'"' + k + b'":' + v for k, v in items if k in _FIELD_BYTES]
    if not parts:
        return None
    return msgspec.json.decode(b"{" + b",".join(parts) + b"}", type=JobRecord)


def vector_text(job: JobRecord) -> str:
    """The job's forecast vector as the scripts keep it: ``entry=value;...`` (non-zero entries)."""
    vec = job_vector(job.task, np.asarray(job.features, dtype=np.float64))
    return ";".join(f"{i}={float(v)!r}" for i, v in enumerate(vec) if v != 0.0 and math.isfinite(v))


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([float(v) if v is not None else 0.0 for v in values], dtype=np.float64)


class RedisBroker(LocalEvents):
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
        self._redis: Any = aioredis.Redis.from_url(url, **_client_options(socket_timeout=timeout))  # redis-py types are loose
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

    # ----- plumbing --------------------------------------------------------------------

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

    @_guarded
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = False
        await self._measure_clock()
        last = await self._redis.xrevrange(self.events_key, count=1)
        last_id = last[0][0] if last else b"0-0"
        self._reader_redis = aioredis.Redis.from_url(self.url, **_client_options(socket_timeout=READ_BLOCK_MS / 1000 + 10))
        self.last_event_id = last_id
        self._reader = asyncio.create_task(self._read_events(last_id))

    @_guarded
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

    # ----- queue ---------------------------------------------------------------------

    def _valid_until(self) -> str:
        """The broker time after which a script sent now must not act: its answer
        would come after this call gave up (half the timeout leaves room for the
        answer's way back and the clock offset's error)."""
        return repr(self.now() + self.timeout / 2)

    @_guarded
    async def submit(
        self, job: JobRecord, blobs: dict[str, bytes], capacity: int, idempotency: SubmitKey | None = None
    ) -> tuple[str, str] | None:
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
                len(blobs),
                *(x for k, v in blobs.items() for x in (k, v)),
                *encode_fields(job, names),
            )
        except _ERRORS as exc:  # sent, perhaps run: settled by now (valid_until), read it back to know
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
        if code < 0:
            raise QueueFullError(int(res[1]))
        job.seq = code
        job.created_at = float(res[1])
        return None

    @_guarded
    async def claim(self, model: str, worker: str, lease: float, timeout: float) -> JobRecord | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            wake = asyncio.Event()
            waiters = self._claim_waiters.setdefault(model, set())
            waiters.add(wake)  # registered before the try: a submit in between still wakes us
            try:
                raw = await self._script("claim", model, _json(worker), float(lease), self._valid_until())
                if raw:
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

    async def claim_batch(self, model: str, worker: str, lease: float, plan: BatchPlan) -> list[JobRecord]:
        return []  # not yet in one script: the head is claimed alone

    @_guarded
    async def standing(self, job: JobRecord | None, model: str) -> Standing:
        level = str(job.priority + LEVEL_SHIFT) if job is not None else ""
        running_raw, totals, prefix, waits = await self._script("standing", model, job.id if job is not None else "", WIDTH, level)
        running = [r for r in (decode_record(raw) for raw in running_raw) if r is not None]
        running.sort(key=lambda j: j.seq)
        ahead = np.zeros(WIDTH, dtype=np.float64)
        if int(waits):  # (redis_scripts: a level's popped heads stay in its tree, and are subtracted)
            for level in totals:
                total, popped = _floats(level).reshape(2, WIDTH)
                ahead += total - popped
            if prefix:  # only the entries the level uses
                used, values = [int(e) for e in prefix[0]], _floats(prefix[1]).reshape(-1, len(prefix[0]))
                ahead[used] += values[1:].sum(axis=0) - values[0]
        return Standing(running=running, ahead=ahead)

    @_guarded
    async def depth(self, model: str) -> tuple[int, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.queue(model))
            pipe.zcard(self.keys.running(model))
            waiting, running = await pipe.execute()
        return int(waiting), int(running)

    @_guarded
    async def waiting(self, model: str, limit: int) -> list[JobRecord]:
        if limit <= 0:
            return []
        ids = await self._redis.zrange(self.keys.queue(model), 0, limit - 1)
        return [r for _, r in await self._records(ids) if r is not None]

    @_guarded
    async def running(self, model: str) -> list[JobRecord]:
        ids = await self._redis.zrange(self.keys.running(model), 0, -1)
        out = [r for _, r in await self._records(ids) if r is not None]
        out.sort(key=lambda j: j.seq)
        return out

    # ----- store ---------------------------------------------------------------------

    @_guarded
    async def get(self, job_id: str) -> JobRecord | None:
        return decode_record(await self._redis.hgetall(self.keys.job(job_id)))

    @_guarded
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

    @_guarded
    async def finished_count(self) -> int:
        return int(await self._redis.zcard(self.keys.done()))

    @_guarded
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

    @_guarded
    async def update(self, job: JobRecord, fields: dict[str, Any], *, attempt: int | None = None) -> bool:
        return await self._update(job, fields, attempt)

    async def _update(self, job: JobRecord, fields: dict[str, Any], attempt: int | None) -> bool:
        unknown = set(fields) - _FIELD_SET
        if unknown:
            raise ValueError(f"not job record fields: {sorted(unknown)}")
        kind = "progress" if PROGRESS_FIELDS.issuperset(fields) else "change"
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, _json(value)]
        ok = await self._script("update", job.id, "" if attempt is None else str(attempt), kind, *pairs)
        if int(ok):
            for name, value in fields.items():
                setattr(job, name, value)
            return True
        return False

    def progress_threadsafe(self, job: JobRecord) -> None:
        """A job someone follows (its ``followed_until``, set by the API node that
        streams its events) gets every step written; any other job a step at once
        (its answer says whether it is followed), then at most one every
        ``PROGRESS_INTERVAL`` (the newest wins): a write wakes
        this process's loop and takes the GIL from the pipeline thread, which on a fast
        model costs the GPU more than the write itself."""
        loop = self._loop
        if loop is None or self._closed:
            return
        self._progress_jobs[job.id] = job  # the newest progress (a dict store: safe from this thread)
        if job.id in self._progress_tasks:
            return  # a writer is on it
        with contextlib.suppress(RuntimeError):  # the loop closed under us
            loop.call_soon_threadsafe(self._progress_kick, job.id)

    def _progress_kick(self, job_id: str) -> None:
        if job_id not in self._progress_tasks and job_id in self._progress_jobs and not self._closed:
            self._progress_tasks[job_id] = asyncio.create_task(self._progress_writer(job_id))

    async def _progress_writer(self, job_id: str) -> None:
        """One write in flight per job, then a pause that gathers the next steps."""
        backoff = 0.1
        try:
            while job_id in self._progress_jobs:
                job = self._progress_jobs.pop(job_id)
                fields = {"step": job.step, "total_steps": job.total_steps, "first_step_at": job.first_step_at, "last_step_at": job.last_step_at}
                try:
                    followed = await self._script(
                        "update", job.id, str(job.attempt), "progress", *(x for k, v in fields.items() for x in (k, _json(v)))
                    )
                    backoff = 0.1
                    if int(followed) != 2:  # nobody follows it step by step: gather the next steps
                        await asyncio.sleep(PROGRESS_INTERVAL)
                except _ERRORS as exc:
                    log.warning("progress of job %s not written (Redis at %s): %s", job_id, self.address, exc)
                    self._progress_jobs.setdefault(job_id, job)
                    await asyncio.sleep(backoff)
                    backoff = min(2.0, backoff * 2)
                except Exception:
                    log.exception("progress of job %s not written", job_id)
        finally:
            self._progress_tasks.pop(job_id, None)
            if job_id in self._progress_jobs:  # a step came as this writer was leaving
                self._progress_kick(job_id)

    @_guarded
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
        unknown = set(fields) - _FIELD_SET
        if unknown:
            raise ValueError(f"not job record fields: {sorted(unknown)}")
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, _json(value)]
        fence = "waiting" if only_waiting else "" if attempt is None else str(attempt)
        stored = (x for k, v in blobs.items() for x in (k, v))  # written by the script, past the fence only
        res = await self._script("finish", job.id, fence, _json(JobStatus(status)), ttl, len(blobs), *stored, *pairs)
        if not res:
            return False
        for name, value in fields.items():
            setattr(job, name, value)
        job.status = JobStatus(status)
        job.finished_at = float(res)
        return True

    @_guarded
    async def release(self, job: JobRecord, attempt: int) -> bool:
        ok = int(await self._script("release", job.id, str(attempt)))
        if ok:
            job.status = JobStatus.WAITING
            job.worker = None
            job.step = 0
            job.first_step_at = job.last_step_at = None
        return bool(ok)

    @_guarded
    async def cancel(self, job_id: str, message: str) -> JobRecord | None:
        res = await self._cancel(job_id, message)
        return res[1] if res is not None else None

    async def _cancel(self, job_id: str, message: str) -> tuple[bytes, JobRecord | None] | None:
        res = await self._script("cancel", job_id, _json(message), self._ttl_seconds())
        if not res:
            return None
        return res[0], decode_record(res[1])

    @_guarded
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

    @_guarded
    async def put_blob(self, key: str, data: bytes) -> None:
        await self._redis.set(self.keys.blob(key), data, ex=self._ttl_seconds())

    @_guarded
    async def put_attempt_blob(self, job_id: str, attempt: int, key: str, data: bytes) -> bool:
        return bool(int(await self._script("put_attempt_blob", job_id, str(attempt), key, data, self._ttl_seconds())))

    @_guarded
    async def get_blob(self, key: str) -> bytes | None:
        data = await self._redis.get(self.keys.blob(key))
        return bytes(data) if data is not None else None

    @_guarded
    async def delete_blob(self, key: str) -> None:
        await self._redis.delete(self.keys.blob(key))

    # ----- the delivery outbox ----------------------------------------------------------

    @_guarded
    async def claim_deliveries(self, lease: float, limit: int, job_id: str | None = None) -> list[str]:
        ids = await self._script("claim_deliveries", job_id or "", float(lease), int(limit))
        return [i.decode() for i in ids]

    @_guarded
    async def end_delivery(self, job_id: str, fields: dict[str, Any], retry_in: float | None = None) -> None:
        unknown = set(fields) - _FIELD_SET
        if unknown:
            raise ValueError(f"not job record fields: {sorted(unknown)}")
        pairs = [x for name, value in fields.items() for x in (name, _json(value))]
        await self._script("end_delivery", job_id, "" if retry_in is None else repr(float(retry_in)), *pairs)

    # ----- events --------------------------------------------------------------------

    @_guarded
    async def command(self, model: str, action: str) -> None:
        for stream in (self.keys.events(), self.keys.worker_events()):
            await self._redis.xadd(
                stream,
                {"job": "", "model": model, "kind": "command", "action": action},
                maxlen=self.events_maxlen,
                approximate=True,
            )

    async def _read_events(self, last_id: bytes) -> None:
        """The one reader of this instance: wakes waiters, calls the callbacks."""
        assert self._reader_redis is not None
        r = self._reader_redis
        key = self.events_key
        count = max(1, min(READ_COUNT, self.events_maxlen))
        backoff = 0.1
        lost = False
        while not self._closed:
            try:
                if lost:
                    self.notifier.changed_all()
                    for waiters in self._claim_waiters.values():
                        for ev in waiters:
                            ev.set()
                    lost = False
                reply = await r.xread({key: last_id}, count=count, block=READ_BLOCK_MS)
                backoff = 0.1
                if not reply:
                    continue
                entries = reply[0][1]
                if len(entries) >= count and last_id != b"0-0":
                    # behind: if the oldest entry kept is past the last one read, the
                    # stream was trimmed past us and events may have been missed
                    first = await r.xrange(key, count=1)
                    if first and _id_gt(first[0][0], last_id):
                        self.notifier.changed_all()
                for entry_id, data in entries:
                    last_id = self.last_event_id = entry_id
                    self._dispatch(data)
            except asyncio.CancelledError:
                raise
            except _ERRORS as exc:
                log.warning("events reader: Redis at %s: %s (retrying)", self.address, exc)
                lost = True
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
            except Exception:
                log.exception("events reader")
                lost = True
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    def _dispatch(self, data: dict[bytes, bytes]) -> None:
        kind = data.get(b"kind", b"").decode()
        job_id = data.get(b"job", b"").decode()
        model = data.get(b"model", b"").decode()
        if job_id:
            self.notifier.changed(job_id, progress_only=kind == "progress")
        if kind == "submit":
            for ev in self._claim_waiters.get(model, ()):
                ev.set()
        elif kind == "cancel":
            for cb in list(self.cancel_callbacks):
                try:
                    cb(job_id)
                except Exception:
                    log.exception("cancel callback")
        elif kind == "command":
            action = data.get(b"action", b"").decode()
            for cmd in list(self.command_callbacks):
                try:
                    cmd(model, action)
                except Exception:
                    log.exception("command callback")

    # ----- workers -------------------------------------------------------------------

    @_guarded
    async def heartbeat(self, infos: list[WorkerInfo], running: list[tuple[str, int]], lease: float) -> set[str]:
        now = self.now()
        args: list[Any] = [float(lease), len(infos)]
        for info in infos:
            info.seen_at = now
            args += [info.model, info.worker, _json(info)]
        for job_id, attempt in running:
            args += [job_id, str(attempt)]
        sent = time.time()
        redis_time, stop = await self._script("heartbeat", *args)
        self._set_clock(float(redis_time), sent, time.time())
        return {i.decode() for i in stop}

    @_guarded
    async def leave(self, worker: str) -> None:
        models = await self._models()
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zrem(self.keys.presence(model), worker)
                pipe.hdel(self.keys.worker_info(model), worker)
            await pipe.execute()

    @_guarded
    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        models = [model] if model is not None else await self._models()
        now = self.now()
        out: list[WorkerInfo] = []
        for m in models:
            names = await self._redis.zrangebyscore(self.keys.presence(m), now, "+inf")
            if not names:
                continue
            raws = await self._redis.hmget(self.keys.worker_info(m), names)
            out += [msgspec.json.decode(raw, type=WorkerInfo) for raw in raws if raw is not None]
        return out

    @_guarded
    async def reap(self) -> int:
        sent = time.time()
        redis_time, handled = await self._script("reap", self._ttl_seconds(), _json(LOST_TWICE), REAP_BATCH)
        self._set_clock(float(redis_time), sent, time.time())
        return int(handled)

    async def _models(self) -> list[str]:
        return sorted(m.decode() for m in await self._redis.smembers(self.keys.models()))

    # ----- forecast statistics ---------------------------------------------------------

    @_guarded
    async def observe_cost(self, model: str, task: str, decayed: list[float], added: list[float], forget: float) -> None:
        await self._script(
            "observe_cost", model, task, repr(float(forget)), len(decayed), *(repr(float(x)) for x in (*decayed, *added))
        )

    @_guarded
    async def cost_stats(self, model: str) -> dict[str, list[float]]:
        raw = await self._redis.hgetall(self.keys.cost(model))
        return {k.decode(): [float(x) for x in msgspec.json.decode(v)] for k, v in raw.items()}

    @_guarded
    async def set_priors(self, model: str, priors: dict[str, list[float]]) -> None:
        key = self.keys.priors(model)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if priors:
                pipe.hset(key, mapping={t: _json([float(x) for x in v]) for t, v in priors.items()})
            await pipe.execute()

    @_guarded
    async def priors(self, model: str) -> dict[str, list[float]]:
        raw = await self._redis.hgetall(self.keys.priors(model))
        return {k.decode(): [float(x) for x in msgspec.json.decode(v)] for k, v in raw.items()}

    def stats_version(self, model: str) -> int | None:
        return None

    # ----- idempotent submits and quotas ------------------------------------------------

    @_guarded
    async def submitted(self, key: str) -> tuple[str, str] | None:
        kept = await self._redis.get(self.keys.submit(key))
        if kept is None:
            return None
        held_id, _, held_fp = kept.decode().partition(" ")
        if not await self._redis.exists(self.keys.job(held_id)):
            return None
        return held_id, held_fp

    @_guarded
    async def charge(self, owner: str, job_id: str, seconds: float) -> None:
        # several API nodes may book for one owner at once: each booking is one HSET;
        # a check against the quota just before it may let one job too many through
        await self._redis.hset(self.keys.ledger(owner), job_id, _json([self.now(), seconds, True]))

    @_guarded
    async def settle(self, owner: str, job_id: str, seconds: float) -> None:
        key = self.keys.ledger(owner)
        raw = await self._redis.hget(key, job_id)
        if raw is not None:
            at = msgspec.json.decode(raw)[0]
            await self._redis.hset(key, job_id, _json([at, seconds, False]))

    @_guarded
    async def ledger(self, owner: str, since: float) -> list[tuple[str, float, float, bool]]:
        key = self.keys.ledger(owner)
        out: list[tuple[str, float, float, bool]] = []
        stale: list[bytes] = []
        for job_id, raw in (await self._redis.hgetall(key)).items():
            at, seconds, open_ = msgspec.json.decode(raw)
            if at <= since and not open_:
                stale.append(job_id)
            else:
                out.append((job_id.decode(), float(at), float(seconds), bool(open_)))
        if stale:
            await self._redis.hdel(key, *stale)
        return sorted(out, key=lambda e: e[1])


def _client_options(socket_timeout: float) -> dict[str, Any]:
    # a pooled connection that a Redis restart closed fails once: retry on a fresh
    # one (connection errors only: a timed-out script may have run)
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2, supported_errors=(redis.exceptions.ConnectionError,))
    return {
        "protocol": 2,
        "decode_responses": False,
        "socket_connect_timeout": 5,
        "socket_timeout": socket_timeout,
        "health_check_interval": 30,
        "retry": retry,
    }


def _id_gt(a: bytes, b: bytes) -> bool:
    """Stream id ``a`` > ``b``."""
    ams, _, aseq = a.partition(b"-")
    bms, _, bseq = b.partition(b"-")
    return (int(ams), int(aseq or 0)) > (int(bms), int(bseq or 0))
