"""The broker seam: the queue, the job store, events, cancel requests, worker
presence and forecast statistics behind one Protocol.

Two implementations: ``memory`` (one process: the embedded default) and ``redis``
(any number of API nodes and worker hosts on one Redis).  The service layer
(``server.service``) and the worker (``server.worker``) talk to a ``Broker`` and to
nothing below it; its parts (``Queue``, ``Store``, ``Deliveries``, ``Events``, ``Presence``,
``Ledger``, ``Statistics``, ``Pausing``) are Protocols of their own; ``tests/test_broker_contract.py`` runs one contract over both.

Times are the broker's clock (``now()``): wall seconds as the broker tells them.
The memory broker's clock is ``time.time()``; the Redis broker's is Redis's own
``TIME`` (leases and ``started_at`` are set inside its scripts), so API nodes and
workers on hosts whose clocks disagree still agree on every deadline.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from msgspec import Struct

from ..jobs import JobRecord, JobStatus
from .notify import CancelCallback, CommandCallback


class Standing(Struct):
    """What is ahead of a waiting job (or of a new one at the back of the queue)."""

    running: list[JobRecord]  # jobs now running on the model: their remaining time counts
    ahead: np.ndarray  # summed forecast vectors (features.WIDTH) of the waiting jobs ahead; [DIM] = their count


class WorkerInfo(Struct, kw_only=True):
    """One worker process's view of one model it serves (presence, per model)."""

    worker: str  # worker id (unique per process)
    model: str
    host: str = ""
    state: str = "unloaded"  # unloaded / loading / loaded / error
    load_error: str | None = None
    slots: int = 1  # target_inflight: jobs it runs at once
    running: int = 0
    seen_at: float = 0.0  # broker clock of its last heartbeat
    load_seconds: float | None = None  # mean seconds a load of the model took on this worker (residency)
    cold: bool = False  # loaded, and has run no job since: its next job pays the forecast's first_call


class BatchPlan(Struct, frozen=True):
    """A batch to claim (``Broker.claim_batch``): the queue's head, the compatible
    jobs behind it to run with it, and every waiting job the planner saw from the
    head through the last of them (``window``, in run order): the plan holds only
    while no other job has come ahead of one it takes."""

    head: str
    ids: list[str]  # companions, in run order
    window: list[str]


class QueueFullError(Exception):
    """``submit`` refused: the model's queue holds ``capacity`` waiting jobs."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"{depth} jobs waiting")
        self.depth = depth


class BrokerUnavailable(Exception):
    """The broker cannot be reached (Redis down, or it did not answer within
    ``broker.timeout_seconds``); routes answer 503 with ``Retry-After``."""


class SubmitUnknown(BrokerUnavailable):
    """A submit's script was sent but no answer came in time.  The script refuses to
    queue the job once ``valid_until`` (broker clock) has passed, so by the time this
    is raised the outcome is settled: ``task_id`` exists or never will."""

    def __init__(self, message: str, task_id: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class Admission(Struct, frozen=True, kw_only=True):
    """A key's quota, decided by ``submit`` in the step that queues the job (so no two
    API nodes both let one owner past a limit): at most ``max_queued`` unfinished
    jobs, and the GPU-seconds booked in the last ``window`` seconds (plus every
    unfinished job's) plus ``cost`` at most ``budget``.  A queued job is booked at
    ``cost`` and counts as unfinished until it ends (done, error, cancelled, a missed
    deadline); then its booking becomes what it measured."""

    owner: str
    cost: float  # the job's forecast GPU-seconds
    max_queued: int | None = None
    budget: float | None = None  # gpu_seconds_per_hour
    window: float = 3600.0


class QuotaRefused(Exception):
    """``submit`` refused by the owner's ``Admission``: ``limit`` is ``max_queued``
    (``used``: the unfinished jobs, ``jobs`` their ids) or ``gpu_seconds_per_hour``
    (``used``: the GPU-seconds booked; ``wait``: seconds until enough ages out)."""

    def __init__(self, limit: str, used: float, *, jobs: list[str] | None = None, wait: float = 0.0) -> None:
        super().__init__(f"{limit}: {used:g} used")
        self.limit = limit
        self.used = used
        self.jobs = jobs or []
        self.wait = wait


class SubmitKey(Struct, frozen=True):
    """An idempotent submit: its owner-scoped key, the request's fingerprint, and
    how long the key is kept (seconds)."""

    key: str
    fingerprint: str
    ttl: float


class Lifecycle(Protocol):
    name: str  # "memory" or "redis"
    distributed: bool  # True when other processes share the queue (then SIGTERM releases, never cancels)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return when the broker answers; ``BrokerUnavailable`` when it does not (/readyz)."""

    def now(self) -> float:
        """The broker's clock (see the module docstring)."""


class Queue(Protocol):
    """The waiting jobs of each model, in run order, with the sums ahead of each."""

    async def submit(
        self, job: JobRecord, blobs: dict[str, bytes], capacity: int, idempotency: SubmitKey | None = None,
        admission: Admission | None = None,
    ) -> tuple[str, str] | None:  # fmt: skip
        """Store ``job`` and its input blobs and queue it, in one step: sets ``seq``
        and ``created_at``; raises ``QueueFullError`` when ``capacity`` jobs already
        wait.  With ``idempotency``: the key is bound to the job in the same step; a key
        already bound to a job that exists returns (that job's id, its fingerprint) and
        queues nothing.  With ``admission``: the owner's quota is decided and the job
        booked in the same step (``QuotaRefused``: nothing queued); a bound key wins
        over a quota (the same request again is no new job).  A submit of an id that
        exists already is a no-op (a retry).  Raises ``SubmitUnknown`` when the answer
        did not come in time (see there)."""

    async def claim(self, model: str, worker: str, lease: float, timeout: float) -> JobRecord | None:
        """The next waiting job of ``model`` (priority, then the fair-share turn of its
        key — ``JobRecord.share``, see server/queue.py — then the key's own order), now running on
        ``worker`` with a lease of ``lease`` seconds: ``attempt`` bumped, ``started_at``
        set.  Waits up to ``timeout`` seconds for one; None if none came."""

    async def claim_batch(self, model: str, worker: str, lease: float, plan: BatchPlan) -> list[JobRecord]:
        """In one step: the head of ``model``'s queue and the companions of ``plan``
        still waiting with the head's ``batch`` key, claimed as ``claim`` claims one
        (the head first) — when the head is ``plan.head`` and no waiting job that
        ``plan.window`` does not list is ahead of a companion; else nothing ([]) and
        the caller claims as usual.  Never waits."""

    async def standing(self, job: JobRecord | None, model: str) -> Standing:
        """What is ahead of waiting ``job`` (O(log n)); of a job not in the queue (yet):
        what it would queue behind at its priority now; ``job`` None: everything queued."""

    async def move(self, job_id: str, front: bool, first: bool = False) -> bool:
        """A waiting job to the front (or the back) of its fair-share key's jobs at its
        priority; ``first``: to the front of its priority, its key's turn next (as a
        ``release``d job goes).  False when it does not wait."""

    async def depth(self, model: str) -> tuple[int, int]:
        """(waiting, running) of ``model``."""

    async def waiting(self, model: str, limit: int) -> list[JobRecord]:
        """The first ``limit`` waiting jobs of ``model`` in run order."""

    async def running(self, model: str) -> list[JobRecord]: ...


ALL = "*"  # ``Pausing``: every queue (config.py refuses a model of that name)


class Pausing(Protocol):
    """An admin's pause of a model's queue, or of every queue: running jobs finish,
    nothing new is claimed (``claim`` waits as if the queue were empty, ``claim_batch``
    takes nothing), submissions still queue.  Kept by the broker (in Redis: it
    outlives any node)."""

    pause_version: int  # changes when a pause or resume reaches this process (and wakes every follower)

    async def pause(self, model: str, paused: bool) -> None:
        """Pause (``paused``) or resume ``model``'s queue (``ALL``: every queue; a model
        paused on its own stays paused when every queue resumes).  A resume wakes the
        claims waiting on the queue."""

    async def paused(self) -> set[str]:
        """The paused queues: model names, and ``ALL`` while every queue is paused."""


class Store(Protocol):
    """Job records, their fenced changes and their blobs."""

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def recent(self, limit: int, before: tuple[float, str] | None = None) -> list[JobRecord]:
        """Finished jobs, the most recently finished first (ties: the larger id first);
        with ``before`` (finished_at, id): only those after it in that order (a page's cursor)."""

    async def finished_count(self) -> int:
        """How many finished jobs are kept (``recent`` lists them)."""

    async def finished_of(self, owner: str | None) -> int:
        """How many of them are ``owner``'s (a count the broker keeps: no pass over them)."""

    async def jobs_of_task(self, task: str) -> list[JobRecord]:
        """Every kept job of ``task`` (waiting, running and finished), oldest first."""

    async def update(self, job: JobRecord, fields: dict[str, Any], *, attempt: int | None = None) -> bool:
        """Set ``fields`` on the job (and on ``job``).  With ``attempt``: only while
        that attempt is still the job's current one and it is not finished (fencing);
        False when refused.  Wakes the job's followers."""

    def progress_threadsafe(self, job: JobRecord) -> None:
        """From a worker thread, after setting ``job.step`` / ``job.last_step_at`` on
        the worker's copy: make the progress visible (coalesced, never blocking)."""

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
        """End the job, in one step: the result blobs (with the result TTL), the
        record's ``fields``, ``status`` and ``finished_at``, out of the running set, the
        event.  With ``attempt``: refused (False) unless it is the job's current attempt
        and the job runs (a late result of a lost lease is refused, and none of its
        blobs is stored).  With
        ``only_waiting``: refused unless the job is still waiting (it never ran)."""

    async def release(self, job: JobRecord, attempt: int) -> bool:
        """Put a running job back at the head of its priority, without using up its
        retry (a worker stopping within its grace period)."""

    async def cancel(self, job_id: str, message: str) -> JobRecord | None:
        """Waiting: out of the queue, ``cancelled`` now.  Running: the cancel flag is
        set and the worker running it told (it stops at its next step).  Returns the
        record as it now stands; None for an unknown id."""

    async def clear(self, message: str) -> int:
        """Cancel every waiting job of every model; returns how many."""

    async def put_blob(self, key: str, data: bytes) -> None:
        """Store bytes kept for the result TTL (partial images)."""

    async def put_attempt_blob(self, job_id: str, attempt: int, key: str, data: bytes) -> bool:
        """``put_blob`` fenced: only while ``attempt`` is the job's current one and it
        runs (a worker that lost its lease stores no preview); False when refused."""

    async def get_blob(self, key: str) -> bytes | None: ...

    async def take_blob(self, key: str, job: JobRecord | None = None, fields: dict[str, Any] | None = None) -> bytes | None:
        """``get_blob`` and delete it, in one step: of two takers, one gets the bytes.
        When they were there, ``job``'s ``fields`` are set in the same step (a result
        marked fetched)."""


class Deliveries(Protocol):
    """The delivery outbox.  Every step that ends a job (finish, cancel, reap) puts it
    in the outbox when it has a delivery to make (``webhook`` pending, or a done job's
    ``upload_urls``), in the same step: any node drains it (server/delivery/outbox.py),
    at least once."""

    async def claim_deliveries(self, lease: float, limit: int, job_id: str | None = None) -> list[str]:
        """Due outbox entries (``job_id``'s only, or the first ``limit``), each claimed
        for ``lease`` seconds (then due again: its drainer died)."""

    async def end_delivery(self, job_id: str, fields: dict[str, Any], retry_in: float | None = None) -> None:
        """Record a delivery's outcome ``fields`` on the job (when it still exists) and
        take it out of the outbox; with ``retry_in``: keep it, due again that much later."""


class Events(Protocol):
    """Wake-ups (the record is the truth), cancel requests and model commands."""

    async def wait_change(self, job_id: str, timeout: float | None, *, progress: bool = True) -> bool:
        """Wait for the job's next change (``progress=False``: not a mere step); False
        on timeout.  Waiters re-read the record: the event is only a wake-up."""

    def submits(self, model: str) -> int:
        """How many submits of ``model`` this process has seen (a mark for ``wait_submitted``)."""

    def emptied(self, model: str) -> bool:
        """Whether this process's last claim of ``model`` left its queue empty, with no
        submit of it seen since: a hint (a requeued job is not seen)."""

    async def wait_submitted(self, model: str, timeout: float, seen: int) -> bool:
        """Wait up to ``timeout`` seconds for a submit of ``model`` after the mark
        ``seen`` (``submits``, taken before the caller read the queue: none is missed);
        False when none came.  A wake-up only: the caller reads the queue again."""

    def on_cancel(self, callback: CancelCallback) -> None:
        """Called (on the event loop) with the id of every job whose cancel was asked."""

    def on_command(self, callback: CommandCallback) -> None:
        """Called (on the event loop) with model admin commands: (model, "load"|"unload")."""

    async def command(self, model: str, action: str) -> None:
        """Send a model admin command to every worker (those configured for ``model`` act)."""


class Presence(Protocol):
    """Which workers serve which models, the leases of their jobs, and the reaper."""

    async def heartbeat(self, infos: list[WorkerInfo], running: list[tuple[str, int]], lease: float) -> set[str]:
        """A worker is alive: its presence per model, and the leases of its running
        ``(job_id, attempt)`` extended by ``lease`` seconds.  Returns the ids of those
        it must stop (cancel asked, or the attempt is no longer the job's)."""

    async def leave(self, worker: str) -> None:
        """A worker stops: its presence goes at once."""

    async def workers(self, model: str | None = None) -> list[WorkerInfo]:
        """Live workers (of ``model``), as they last reported."""

    async def reap(self) -> int:
        """Jobs whose lease expired: back at the head of their priority once; lost a
        second time: ``error``.  Idempotent; every node runs it.  Returns jobs handled."""


class Ledger(Protocol):
    """Idempotent submits and what each key has booked (quotas: ``Admission``; the
    bookings are made by ``submit`` and settled by every step that ends a job)."""

    async def submitted(self, key: str) -> tuple[str, str] | None:
        """(job id, fingerprint) an idempotency key is bound to, if its job exists."""

    async def ledger(self, owner: str) -> tuple[list[str], list[tuple[str, float, float, bool]]]:
        """``owner``'s unfinished jobs (those ``submit`` admitted with an ``Admission``),
        and its GPU-second bookings: (job id, booked at, seconds, open), oldest first."""


class Statistics(Protocol):
    """What the forecast has learned of each model (kept here so every node shares it)."""

    async def observe_cost(self, model: str, task: str, decayed: list[float], added: list[float], forget: float) -> None:
        """stats = forget * stats + decayed (first part), + added (second part): one
        finished job's contribution to the model's forecast fit (``forecast.CostModel``)."""

    async def cost_stats(self, model: str) -> dict[str, list[float]]:
        """The forecast statistics per task of ``model`` (as ``observe_cost`` made them)."""

    async def set_priors(self, model: str, priors: dict[str, list[float]]) -> None:
        """The loaded backend's own forecast prior, for API nodes that never load it."""

    async def priors(self, model: str) -> dict[str, list[float]]: ...

    def stats_version(self, model: str) -> int | None:
        """A number that changes when ``model``'s statistics change, where the broker
        can tell cheaply (memory); None where callers must refresh by time (redis)."""


class Broker(Lifecycle, Queue, Pausing, Store, Deliveries, Events, Presence, Ledger, Statistics, Protocol):
    """Everything a node holds of the shared state: the parts above, one object.
    ``memory.MemoryBroker`` and ``redis.RedisBroker`` implement it; the contract suite
    (tests/test_broker_contract.py) runs over both."""
