"""Change waiters of one process, by job id (event-loop side).

Both brokers wake them: the memory broker when it changes a record, the Redis
broker when its event reader sees the job in the events stream.  A waiter is
only woken; it then re-reads the record, which is the truth.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

CancelCallback = Callable[[str], None]  # job id: stop it if it runs here
CommandCallback = Callable[[str, str], None]  # (model, action): load / unload


class _Expired(Exception):
    pass


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


def _wake(waiters: list[asyncio.Future[None]] | None) -> None:
    if not waiters:
        return
    pending = list(waiters)
    waiters.clear()
    for fut in pending:
        if not fut.done():
            fut.set_result(None)


class Notifier:
    def __init__(self) -> None:
        self._any: dict[str, list[asyncio.Future[None]]] = {}  # woken by every change
        self._status: dict[str, list[asyncio.Future[None]]] = {}  # woken by all but a mere step

    def followed(self, job_id: str) -> bool:
        """Whether anyone waits for the job's progress (safe to read from any thread)."""
        return bool(self._any.get(job_id))

    def changed(self, job_id: str, *, progress_only: bool = False) -> None:
        """Wake the job's waiters (event loop only); a step wakes only progress followers."""
        _wake(self._any.get(job_id))
        if not progress_only:
            _wake(self._status.get(job_id))

    def changed_progress(self, job_id: str) -> None:
        self.changed(job_id, progress_only=True)

    def changed_all(self) -> None:
        """Wake everyone (events may have been missed: re-read every followed job)."""
        for waiters in (*self._any.values(), *self._status.values()):
            _wake(waiters)

    async def wait(self, job_id: str, timeout: float | None, *, progress: bool = True) -> bool:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        table = self._any if progress else self._status
        waiters = table.setdefault(job_id, [])
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
            left = table.get(job_id)
            if left is not None:
                if fut in left:
                    left.remove(fut)
                if not left:
                    del table[job_id]


SUBMITTED = "\0submitted "  # + model: the notifier's key of a model's submits (no job id starts so)


class LocalEvents:
    """What both brokers do alike with the events that reach this process: change
    waiters, submit waiters, and the callbacks of this process's worker (cancel,
    model commands)."""

    def __init__(self) -> None:
        self.notifier = Notifier()
        self.cancel_callbacks: list[CancelCallback] = []
        self.command_callbacks: list[CommandCallback] = []
        self.pause_version = 0  # changes when a pause or resume reaches this process
        self._submits_seen: dict[str, int] = {}  # model -> submits seen
        self._emptied_at: dict[str, int] = {}  # model -> submits seen when a claim here left its queue empty

    def pauses_changed(self) -> None:
        """A queue was paused or resumed (here, or on another node): every follower
        re-reads its job, whose status now says so (or no more)."""
        self.pause_version += 1
        self.notifier.changed_all()

    def saw_submit(self, model: str) -> None:
        """A job of ``model`` was queued (event loop only): wake ``wait_submitted``."""
        self._submits_seen[model] = self._submits_seen.get(model, 0) + 1
        self.notifier.changed(SUBMITTED + model)

    def submits(self, model: str) -> int:
        return self._submits_seen.get(model, 0)

    def claimed(self, model: str, left: int) -> None:
        """A claim of this process took a job of ``model`` and left ``left`` waiting."""
        if left == 0:
            self._emptied_at[model] = self._submits_seen.get(model, 0)
        else:
            self._emptied_at.pop(model, None)

    def emptied(self, model: str) -> bool:
        """This process's last claim of ``model`` left its queue empty, and no submit
        of it has reached this process since.  A hint (a job put back by the reaper or
        a stopping worker is not seen), for what to do first, never whether to claim."""
        return self._emptied_at.get(model, -1) == self._submits_seen.get(model, 0)

    async def wait_submitted(self, model: str, timeout: float, seen: int) -> bool:
        if self._submits_seen.get(model, 0) > seen:
            return True
        return await self.notifier.wait(SUBMITTED + model, max(0.0, timeout))

    async def wait_change(self, job_id: str, timeout: float | None, *, progress: bool = True) -> bool:
        return await self.notifier.wait(job_id, timeout, progress=progress)

    def on_cancel(self, callback: CancelCallback) -> None:
        self.cancel_callbacks.append(callback)

    def on_command(self, callback: CommandCallback) -> None:
        self.command_callbacks.append(callback)
