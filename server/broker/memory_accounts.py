"""The memory broker's quota accounts: per owner, its unfinished jobs and its GPU-second
bookings (``base.Admission``), decided and booked inside ``MemoryBroker.submit`` with no
await between the check and the booking, so concurrent requests of one process never
let an owner past a limit.  The same rules as ``lua/submit.lua``'s ``admit``."""

from __future__ import annotations

from ..jobs import JobRecord
from .base import Admission, QuotaRefused


def gpu_seconds(job: JobRecord) -> float:
    """The worker time a finished job used (what its owner is charged)."""
    if job.worker_seconds is not None:
        return job.worker_seconds
    if job.started_at is not None and job.finished_at is not None:
        return max(0.0, job.finished_at - job.started_at)
    return 0.0


class Accounts:
    def __init__(self) -> None:
        self.held: dict[str, set[str]] = {}  # owner -> its unfinished jobs
        self.books: dict[str, dict[str, tuple[float, float, bool]]] = {}  # owner -> job -> (at, seconds, open)

    def admit(self, adm: Admission, job_id: str, now: float) -> None:
        """Raise ``QuotaRefused`` if a job of ``adm.cost`` does not fit ``adm.owner``'s
        quota now; else book it (unfinished, at its cost)."""
        held = self.held.setdefault(adm.owner, set())
        if adm.max_queued is not None and len(held) >= adm.max_queued:
            raise QuotaRefused("max_queued", len(held), jobs=sorted(held))
        book = self.books.setdefault(adm.owner, {})
        if adm.budget is not None:
            for old in [j for j, (at, _, open_) in book.items() if not open_ and at <= now - adm.window]:
                del book[old]  # settled and aged out of the window
            used = sum(seconds for _, seconds, _ in book.values())
            if used + adm.cost > adm.budget:
                raise QuotaRefused(
                    "gpu_seconds_per_hour", used, wait=_aged_out(book, used - adm.budget + adm.cost, adm.window, now)
                )
            book[job_id] = (now, adm.cost, True)
        held.add(job_id)

    def release(self, job: JobRecord) -> None:
        """``job`` has ended: no longer unfinished, its booking what it measured."""
        if job.owner is None:
            return
        self.held.get(job.owner, set()).discard(job.id)
        book = self.books.get(job.owner, {})
        if job.id in book:
            book[job.id] = (book[job.id][0], gpu_seconds(job), False)

    def ledger(self, owner: str) -> tuple[list[str], list[tuple[str, float, float, bool]]]:
        book = self.books.get(owner, {})
        entries = sorted(((j, at, sec, open_) for j, (at, sec, open_) in book.items()), key=lambda e: e[1])
        return sorted(self.held.get(owner, set())), entries


def _aged_out(book: dict[str, tuple[float, float, bool]], over: float, window: float, now: float) -> float:
    """Seconds until settled bookings worth ``over`` GPU-seconds have left the window,
    oldest first (the whole window if they never do: an unfinished job's booking stays
    until it ends)."""
    for at, seconds, open_ in sorted(book.values()):
        if open_:
            continue
        over -= seconds
        if over <= 0:
            return max(0.0, at + window - now)
    return window
