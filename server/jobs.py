"""Jobs: what was asked, where it stands, and what it produced."""

from __future__ import annotations

import asyncio
import enum
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends.base import WorkItem

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
PENDING = "pending"  # a delivery (upload, webhook) not yet attempted or in flight


class JobStatus(str, enum.Enum):
    WAITING = "waiting"  # queued on its model's worker
    RUNNING = "running"  # on the worker (or its results being encoded)
    DONE = "done"  # results available
    ERROR = "error"  # failed; ``message`` says why
    CANCELLED = "cancelled"  # cancelled by a client or at shutdown

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELLED)


@dataclass
class ImageResult:
    index: int
    seed: int
    width: int
    height: int
    format: str
    prompt: str
    data: bytes | None  # None once deleted by the client or evicted
    upload: str | None = None  # pending / ok / failed: reason (with upload_urls)
    seconds: float | None = None  # generation time: its pipeline call's seconds / n

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def new_id() -> str:
    return secrets.token_hex(8)


@dataclass(eq=False)
class Job:
    model: str
    task: str
    items: list[WorkItem]
    priority: int = 0
    format: str = "PNG"
    quality: int = 85
    metadata: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # upscale, upload_urls, webhook_url...
    id: str = field(default_factory=new_id)
    seq: int = 0
    status: JobStatus = JobStatus.WAITING
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    # monotonic clock twins for the forecaster
    started_mono: float | None = None
    last_step_mono: float | None = None
    worker_seconds: float | None = None  # time on the worker, encoding excluded: what forecasts learn
    step: int = 0
    total_steps: int = 0
    message: str | None = None
    results: list[ImageResult] = field(default_factory=list)
    item_seconds: list[float] = field(default_factory=list)  # per pipeline call (worker thread)
    base_url: str = ""  # the server's URL as the submitter saw it (webhook payloads)
    webhook: str | None = None  # pending / ok / failed: reason (with webhook_url)
    extra: dict[str, Any] = field(default_factory=dict)  # backend/training status (loss...)
    # forecasting
    vector: np.ndarray | None = None  # features in its task's block, then a count of one (forecast.job_vector)
    features: np.ndarray | None = None
    predicted: float = 0.0
    expected_at_submit: float = 0.0
    pos_at_submit: int = 0
    # queue bookkeeping
    level: Any = None
    slot: int = -1
    # change notification (event-loop side)
    _waiters: list[asyncio.Future[None]] = field(default_factory=list, repr=False)  # any change
    _status_waiters: list[asyncio.Future[None]] = field(default_factory=list, repr=False)  # not progress
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    # called on the worker thread with each preview image (OpenAI partial images)
    preview_sink: Callable[[Any], None] | None = field(default=None, repr=False)
    preview_steps: frozenset[int] = frozenset()

    @property
    def task_length(self) -> int:
        return sum(item.n for item in self.items)

    @property
    def progress(self) -> float:
        if self.status is JobStatus.DONE:
            return 1.0
        if self.total_steps <= 0:
            return 0.0
        return min(1.0, self.step / self.total_steps)

    @property
    def seed(self) -> int | None:
        return self.items[0].seed if self.items else None

    @property
    def delivering(self) -> bool:
        """True while uploads or the webhook of a finished job are still under way."""
        return self.webhook == PENDING or any(r.upload == PENDING for r in self.results)

    def touch(self) -> None:
        """Wake everyone waiting for a change (event loop only)."""
        _wake(self._waiters)
        _wake(self._status_waiters)

    def progressed(self) -> None:
        """A step finished: wake only the waiters that follow progress (event loop only)."""
        _wake(self._waiters)

    @property
    def followed(self) -> bool:
        """Whether someone waits for progress (read from the worker thread)."""
        return bool(self._waiters)

    async def wait_change(self, timeout: float | None, *, progress: bool = True) -> bool:
        """Wait for the next change (with ``progress=False``: not a mere step); False on timeout."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        waiters = self._waiters if progress else self._status_waiters
        waiters.append(fut)
        # a timer on the future itself, not asyncio.wait_for: one loop pass less per wake-up
        timer = loop.call_later(timeout, _expire, fut) if timeout is not None else None
        try:
            await fut
            return True
        except _Expired:
            return False
        finally:
            if timer is not None:
                timer.cancel()
            if fut in waiters:
                waiters.remove(fut)

    async def wait_while(self, busy: Callable[[Job], bool], deadline: float) -> None:
        """Wait through status changes while ``busy(self)`` holds, until ``deadline``
        (``time.monotonic()``)."""
        while busy(self) and (left := deadline - time.monotonic()) > 0:
            await self.wait_change(left, progress=False)

    def result_bytes(self) -> int:
        return sum(len(r.data) for r in self.results if r.data is not None)


class _Expired(Exception):
    pass


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    pending = list(waiters)
    waiters.clear()
    for fut in pending:
        if not fut.done():
            fut.set_result(None)
