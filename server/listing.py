"""``/api/tasks``: the jobs a caller may list, filtered (status, model, since) and
scoped (own, shared, all), one page of finished jobs at a time (a cursor), with
totals.

Private prompts: in the ``shared`` scope every key's waiting and running jobs are
listed, and another key's job is shown as a job (its id, model, task, status,
position, forecast, size and progress) without what it asked: no prompt, images,
metadata, seed or webhook (``private: true``).  Only an admin sees every job in
full (``all``, an admin's default); a key's default is its own jobs (``own``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .auth import Caller
from .errors import BadRequest, Forbidden
from .jobs import JobRecord, JobStatus
from .schemas import JobStatusResponse, TasksResponse
from .service import Service
from .views import job_status, private_status

SCOPES = ("own", "shared", "all")
QUEUED = frozenset((JobStatus.WAITING, JobStatus.RUNNING))
EVERY = frozenset(JobStatus)
PAGE = 500  # finished jobs read from the broker at a time


@dataclass(frozen=True)
class Filter:
    """Which jobs: those of ``statuses``, of ``model`` (None: any), submitted at or
    after ``since`` (unix time; None: any)."""

    statuses: frozenset[JobStatus] = EVERY
    model: str | None = None
    since: float | None = None

    def matches(self, job: JobRecord) -> bool:
        return (
            job.status in self.statuses
            and (self.model is None or job.model == self.model)
            and (self.since is None or job.created_at >= self.since)
        )

    @property
    def everything(self) -> bool:
        return self.statuses == EVERY and self.model is None and self.since is None

    def before_since(self, job: JobRecord) -> bool:
        """A finished job, listed newest first, that finished before ``since``: every
        job after it was submitted before ``since`` too (the listing ends there)."""
        return self.since is not None and (job.finished_at or 0.0) < self.since


@dataclass(frozen=True)
class Scope:
    """Whose jobs a caller lists, and which of them it sees without their prompts."""

    caller: Caller
    name: str  # one of SCOPES

    def own(self, job: JobRecord) -> bool:
        return job.owner == self.caller.key_id

    def lists(self, job: JobRecord) -> bool:
        if self.name == "all":
            return True
        return self.own(job) or (self.name == "shared" and not job.status.finished)

    def private(self, job: JobRecord) -> bool:
        return not self.caller.admin and not self.own(job)


def parse(params: Mapping[str, str], caller: Caller, service: Service) -> tuple[Filter, Scope]:
    """The query of ``/api/tasks`` (400s name the parameter; ``scope=all`` is for admins)."""
    scope = params.get("scope") or ("all" if caller.admin else "own")
    if scope not in SCOPES:
        raise BadRequest(f"scope {scope[:40]!r} is not one of {', '.join(SCOPES)}", param="scope")
    if scope == "all" and not caller.admin:
        raise Forbidden(
            "scope=all lists every key's jobs with their prompts: it needs an admin key; "
            "scope=shared lists the others' queued jobs without them", param="scope", code="admin_only",
        )  # fmt: skip
    statuses = EVERY
    if raw := params.get("status"):
        names = [s.strip() for s in raw.split(",") if s.strip()]
        valid = [s.value for s in JobStatus]
        wrong = [n for n in names if n not in valid]
        if wrong or not names:
            raise BadRequest(f"status {raw[:60]!r} is not a comma-separated list of {', '.join(valid)}", param="status")
        statuses = frozenset(JobStatus(n) for n in names)
    model = params.get("model") or None
    if model is not None:
        model = service.model(model).name  # 404 naming the configured models
    since = None
    if (raw := params.get("since")) is not None and raw != "":
        try:
            since = float(raw)
        except ValueError:
            since = float("nan")
        if since != since or abs(since) == float("inf"):
            raise BadRequest(f"since {raw[:40]!r} is not a time; send unix seconds (e.g. 1765000000.5)", param="since")
    return Filter(statuses, model, since), Scope(caller, scope)


def _models(service: Service, flt: Filter) -> list[str]:
    return [flt.model] if flt.model is not None else list(service.registry.models)


async def queued(service: Service, flt: Filter, scope: Scope, limit: int) -> tuple[list[JobRecord], int]:
    """Running, then the first ``limit`` waiting jobs of each model the listing holds,
    and how many unfinished jobs it holds in all: the broker's depths where it holds
    every one, else one pass over them (a key's own jobs behind others' are found)."""
    broker = service.broker
    everyone = flt.everything and scope.name != "own"
    out: list[JobRecord] = []
    total = 0
    for name in _models(service, flt):
        running = await broker.running(name) if JobStatus.RUNNING in flt.statuses else []
        waiting = await broker.waiting(name, limit if everyone else 2**31) if JobStatus.WAITING in flt.statuses else []
        listed = [j for j in running + waiting if flt.matches(j) and scope.lists(j)]
        total += sum(await broker.depth(name)) if everyone else len(listed)
        out += [j for j in listed if j.status is JobStatus.RUNNING] + [j for j in listed if j.status is JobStatus.WAITING][:limit]
    return out, total


async def finished(
    service: Service, flt: Filter, scope: Scope, limit: int, before: tuple[float, str] | None = None
) -> tuple[list[JobRecord], tuple[float, str] | None]:
    """Up to ``limit`` finished jobs after ``before`` (most recently finished first),
    and the cursor of the next page (None: there is no more)."""
    out: list[JobRecord] = []
    if flt.statuses <= QUEUED:
        return out, None
    page = max(limit + 1, PAGE)
    while True:
        batch = await service.broker.recent(page, before)
        for job in batch:
            if flt.before_since(job):
                return out, None
            if not (flt.matches(job) and scope.lists(job)):
                continue
            if len(out) == limit:
                return out, (out[-1].finished_at or 0.0, out[-1].id)
            out.append(job)
        if len(batch) < page:
            return out, None
        before = (batch[-1].finished_at or 0.0, batch[-1].id)


async def finished_total(service: Service, flt: Filter, scope: Scope) -> int:
    """How many finished jobs the listing holds over all its pages: the broker's
    counts where nothing is filtered (per owner for a key's own), else one pass
    (down to ``since``)."""
    broker = service.broker
    if flt.everything:
        return await (broker.finished_count() if scope.name == "all" else broker.finished_of(scope.caller.key_id))
    done, before = 0, None
    while not flt.statuses <= QUEUED:
        batch = await broker.recent(PAGE, before)
        for job in batch:
            if flt.before_since(job):
                return done
            done += flt.matches(job) and scope.lists(job)
        if len(batch) < PAGE:
            break
        before = (batch[-1].finished_at or 0.0, batch[-1].id)
    return done


async def tasks(
    service: Service, flt: Filter, scope: Scope, limit: int, before: tuple[float, str] | None, base_url: str
) -> TasksResponse:
    """The answer of ``/api/tasks``: another key's job shown ``private`` where the scope says."""

    def shown(job: JobRecord, status: JobStatusResponse) -> JobStatusResponse:
        return private_status(status) if scope.private(job) else status

    queue = []
    unfinished, queue_total = await queued(service, flt, scope, limit)
    for job in unfinished:
        job, where = await service.where(job)
        queue.append(shown(job, job_status(job, base_url, where, service.sign)))
    jobs, after = await finished(service, flt, scope, limit, before)
    recent = [shown(j, job_status(j, base_url, sign=service.sign)) for j in jobs]
    recent_total = await finished_total(service, flt, scope)
    cursor = None if after is None else f"{after[0]!r}_{after[1]}"
    return TasksResponse(
        queue=queue, recent=recent, queue_total=queue_total, recent_total=recent_total, next_cursor=cursor, scope=scope.name
    )
