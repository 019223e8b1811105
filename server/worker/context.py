"""A running job's context on the model's thread: its steps, previews and cancel flag.

``JobContext`` is the ``StepContext`` a backend sees (server/backends/base.py): it maps
a call's own steps onto the job's total and makes progress visible through the
broker.  The backend's reported total is authoritative: an img2img call of 20 steps
at strength 0.35 reports 7, and the job's ``total_steps`` follows it (the build
already counts ``Item.run_steps``, so this only corrects a family that rounds
otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..backends.base import JobCancelled
from ..broker.base import Broker, BrokerUnavailable
from ..jobs import JobRecord, live_preview_key, preview_key
from ..timing import CallTimes
from .encode import encode

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger("easel")
LIVE_PREVIEW_INTERVAL = 0.25  # seconds between live previews of one job (at most 4 a second)
LIVE_PREVIEW_REFRESH = 0.5  # how often a running job re-reads whether someone follows its previews
LIVE_PREVIEW_QUALITY = 70  # JPEG quality of live previews


class LoopClock:
    """The CPU seconds the event loop's thread has run, readable from any thread (0
    where the platform cannot say).  Made on the loop's thread."""

    def __init__(self) -> None:
        try:
            self._clock: int | None = time.pthread_getcpuclockid(threading.get_ident())
        except (AttributeError, OSError):  # not on this platform
            self._clock = None

    def seconds(self) -> float:
        return time.clock_gettime(self._clock) if self._clock is not None else 0.0


class JobContext:
    """``StepContext`` for one job (worker thread): maps item-local steps onto the
    job's total and makes progress visible through the broker.

    Previews, one mechanism for two askers: the OpenAI stream's ``partial_images``
    (exactly that many, spread over the steps: blobs ``preview_key(job, k)``, counted
    by the record's ``previews``), and live previews while someone follows the job with
    ``/api/events?previews=true`` (the record's ``preview_wanted_until``, renewed by the
    follower and re-read here every ``LIVE_PREVIEW_REFRESH`` s on the loop): at most one
    every ``LIVE_PREVIEW_INTERVAL`` s, the latest only (blob ``live_preview_key(job)``,
    overwritten; the record's ``preview_seq`` / ``preview_step`` say which)."""

    def __init__(
        self, job: JobRecord, broker: Broker, cancel: threading.Event, loop: asyncio.AbstractEventLoop, clock: LoopClock | None = None
    ) -> None:
        self.job = job
        self.job_id = job.id
        self.broker = broker
        self.cancel = cancel
        self.loop = loop
        self.offset = 0  # steps of the job's earlier pipeline calls
        self.call_steps = 0  # steps the current call runs: expected (``begin_call``), then as the backend reports
        self.calls: list[CallTimes] = []  # the pipeline calls' step times, for the forecast's phases
        self.started = time.monotonic()
        self.last_step = self.started  # when the job last reported a step (the watchdog reads it)
        self.clock = clock
        self.loop_mark = clock.seconds() if clock is not None else 0.0  # the loop's CPU seconds at the last step
        self.abandoned = False  # its record was ended without it (stalled): stop at the next step
        self.started_at = job.started_at or broker.now()  # the broker's clock, as the claim set it
        self.preview_steps = preview_steps(job.total_steps, job.partial_images)
        self._previews = 0
        self.live_until = job.preview_wanted_until  # broker clock
        self._live_seq = job.preview_seq
        self._last_live = -LIVE_PREVIEW_INTERVAL  # time.monotonic() of the last live preview
        self._wanted: dict[int, tuple[bool, bool]] = {}  # step -> (partial, live): previews asked for, not handed over yet
        self._asked = 0  # the step of the last ``wants_preview``
        self._flushing = False  # an update of ``extra`` / ``previews`` is in flight
        self._dirty: dict[str, Any] = {}
        self._blobs: list[tuple[str, bytes]] = []

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def begin_call(self, expected_steps: int) -> CallTimes:
        """A pipeline call of ``expected_steps`` steps starts (its times, for the forecast)."""
        self.call_steps = expected_steps
        self.calls.append(times := CallTimes(time.monotonic()))
        return times

    def end_call(self) -> None:
        """The call returned: later steps count after its own."""
        if self.calls:
            self.calls[-1].end = time.monotonic()
        self.offset += self.call_steps
        self.call_steps = 0

    def step(self, i: int, total: int, at: float | None = None) -> None:
        """``at``: when the step ended (``time.monotonic``), if not now: a model in its
        own process reports its steps a little before the server reads them."""
        now = time.monotonic() if at is None else min(at, time.monotonic())
        self.last_step = now
        if self.clock is not None:
            self.loop_mark = self.clock.seconds()
        if self.calls:
            self.calls[-1].steps.append(now)
        if self.cancel.is_set() or self.abandoned:
            raise JobCancelled()
        job = self.job
        if total > 0 and total != self.call_steps:  # the backend knows what its call runs
            job.total_steps += total - self.call_steps
            self.call_steps = total
        job.step = self.offset + i
        job.last_step_at = self.started_at + (now - self.started)
        if job.first_step_at is None:
            job.first_step_at = job.last_step_at
        self.broker.progress_threadsafe(job)

    def held_up(self) -> float:
        """The CPU seconds the event loop has run since the last step (0 without a clock:
        a model in its own process)."""
        return max(0.0, self.clock.seconds() - self.loop_mark) if self.clock is not None else 0.0

    def wants_preview(self, i: int) -> bool:
        step = self.offset + i
        partial = step in self.preview_steps
        now = time.monotonic()
        live = (
            step < self.job.total_steps  # the last step's image is the result
            and now - self._last_live >= LIVE_PREVIEW_INTERVAL
            and self.live_until > self.started_at + (now - self.started)
        )
        if live:
            self._last_live = now
        self._asked = step
        if partial or live:
            self._wanted[step] = (partial, live)
        return partial or live

    def preview(self, image: Image, i: int | None = None) -> None:
        """The preview asked for by ``wants_preview(i)`` (by default the last asked): a
        partial image (OpenAI ``partial_images``: the blob ``preview_key(job, k)``,
        counted by the record's ``previews``) and/or the live preview (a JPEG,
        ``live_preview_key``).  A model in its own process is asked a step ahead, so
        its preview names its step."""
        step = self._asked if i is None else self.offset + i
        wanted = self._wanted.pop(step, None)
        for older in [s for s in self._wanted if s < step]:  # asked for, never drawn (no latents to show)
            del self._wanted[older]
        if wanted is None:
            return
        partial, live = wanted
        if partial:
            self.loop.call_soon_threadsafe(self._preview_ready, encode(image, self.job.format, self.job.quality))
        if live:
            self.loop.call_soon_threadsafe(self._live_ready, step, encode(image, "JPEG", LIVE_PREVIEW_QUALITY))

    async def follow_previews(self) -> None:
        """Re-read (on the loop) whether someone follows the job's live previews,
        until cancelled: the follower may be another process (an API node)."""
        while True:
            await asyncio.sleep(LIVE_PREVIEW_REFRESH)
            try:
                record = await self.broker.get(self.job_id)
            except BrokerUnavailable:
                continue
            if record is not None:
                self.live_until = record.preview_wanted_until

    def set_extra(self, **values: Any) -> None:
        """Publish backend-specific status (training loss...)."""
        self.loop.call_soon_threadsafe(self._extra_ready, values)

    def publish(self, fields: dict[str, Any]) -> None:
        """Store record fields (from the model's thread), with the next progress write."""
        self.loop.call_soon_threadsafe(self._push, fields)

    # event-loop side: one update in flight at a time, the newest values win

    def _preview_ready(self, data: bytes) -> None:
        key = preview_key(self.job_id, self._previews)
        self._previews += 1
        self._push({"previews": self._previews}, (key, data))

    def _live_ready(self, step: int, data: bytes) -> None:
        self._live_seq += 1
        self._push({"preview_seq": self._live_seq, "preview_step": step}, (live_preview_key(self.job_id), data))

    def _extra_ready(self, values: dict[str, Any]) -> None:
        self.job.extra = {**self.job.extra, **values}
        self._push({"extra": dict(self.job.extra)})

    def _push(self, fields: dict[str, Any], blob: tuple[str, bytes] | None = None) -> None:
        self._dirty.update(fields)
        if blob is not None:  # blobs are written in order, before the count that names them
            self._blobs.append(blob)
        if not self._flushing:
            self._flushing = True
            self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._dirty or self._blobs:
                blobs, self._blobs = self._blobs, []
                fields, self._dirty = self._dirty, {}
                for key, data in blobs:  # fenced: a lost attempt's previews never become the job's
                    await self.broker.put_attempt_blob(self.job_id, self.job.attempt, key, data)
                if fields:
                    await self.broker.update(self.job, fields, attempt=self.job.attempt)
        except BrokerUnavailable as exc:
            log.warning("job %s: progress not stored (%s)", self.job_id, exc)
        finally:
            self._flushing = False


def preview_steps(total_steps: int, count: int) -> frozenset[int]:
    """``count`` steps spread evenly over the job, before its last step."""
    return frozenset(s for i in range(count) if 0 < (s := total_steps * (i + 1) // (count + 1)) < total_steps)


@dataclass(eq=False)
class Running:
    """A job running in this process: what stops it and how it ends."""

    job: JobRecord
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)
    release: bool = False  # stopped to be released back to the queue, not cancelled
    error: str | None = None  # stopped for this reason (a time limit): ends as error, not cancelled
    after_job: bool = False  # claimed while another job's results were being stored here (features.TERMS)
    first_call: bool = False  # the first job on its model since the model loaded (features.TERMS)
    ctx: JobContext | None = None  # while its pipeline calls run in this process
    learns: bool = True  # the forecast learns from it (of a batch: only its lead job)
    learn_as: tuple[list[float], float, tuple[float, float, float] | None] | None = None  # a batch's call: features, seconds, phases
