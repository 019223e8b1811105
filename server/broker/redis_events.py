"""The Redis broker's events: the one reader of the events stream (wake-ups, cancel
and command callbacks) and the progress writers (coalesced step writes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from ..jobs import JobRecord
from .base import ALL
from .redis_base import RedisBase
from .redis_codec import (
    ERRORS,
    PROGRESS_INTERVAL,
    READ_BLOCK_MS,
    READ_COUNT,
    client_options,
    field_pairs,
    guarded,
    id_gt,
)

log = logging.getLogger("server.broker.redis")


class RedisEvents(RedisBase):
    @guarded
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = False
        await self._measure_clock()
        if moved := int(await self._script("migrate_lanes")):
            log.warning("%d waiting jobs queued by an older version joined their fair-share lanes", moved)
        last = await self._redis.xrevrange(self.events_key, count=1)
        last_id = last[0][0] if last else b"0-0"
        self._reader_redis = aioredis.Redis.from_url(self.url, **client_options(socket_timeout=READ_BLOCK_MS / 1000 + 10))
        self.last_event_id = last_id
        self._reader = asyncio.create_task(self._read_events(last_id))


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
                        "update", job.id, str(job.attempt), "progress", *field_pairs(fields)
                    )
                    backoff = 0.1
                    if int(followed) != 2:  # nobody follows it step by step: gather the next steps
                        await asyncio.sleep(PROGRESS_INTERVAL)
                except ERRORS as exc:
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

    @guarded
    async def command(self, model: str, action: str) -> None:
        for stream in (self.keys.events(), self.keys.worker_events()):
            await self._redis.xadd(
                stream,
                {"job": "", "model": model, "kind": "command", "action": action},
                maxlen=self.events_maxlen,
                approximate=True,
            )

    @guarded
    async def pause(self, model: str, paused: bool) -> None:
        """The flag in Redis (the claim scripts read it), then an event: a resume wakes
        the claims waiting on the queue(s) in every worker, either wakes the followers
        of jobs on every node (their statuses say paused, or no more)."""
        if paused:
            await self._redis.sadd(self.keys.paused(), model)
            streams = [self.keys.events()]
        else:
            await self._redis.srem(self.keys.paused(), model)
            streams = [self.keys.events(), self.keys.worker_events()]  # (workers wait only for a resume)
        for stream in streams:
            event = {"job": "", "model": model, "kind": "pause" if paused else "resume"}
            await self._redis.xadd(stream, event, maxlen=self.events_maxlen, approximate=True)
        self.pauses_changed()

    @guarded
    async def paused(self) -> set[str]:
        return {m.decode() for m in await self._redis.smembers(self.keys.paused())}

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
                    if first and id_gt(first[0][0], last_id):
                        self.notifier.changed_all()
                for entry_id, data in entries:
                    last_id = self.last_event_id = entry_id
                    self._dispatch(data)
            except asyncio.CancelledError:
                raise
            except ERRORS as exc:
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
        if kind == "submit" or (kind == "resume" and model != ALL):
            if kind == "submit":
                self.saw_submit(model)
            for ev in self._claim_waiters.get(model, ()):
                ev.set()
        elif kind == "resume":  # every queue
            for waiters in self._claim_waiters.values():
                for ev in waiters:
                    ev.set()
        if kind in ("pause", "resume"):
            self.pauses_changed()
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
