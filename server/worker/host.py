"""The model host: the one writer of every model's state in this process.

It loads and unloads models (in this process, or each in its own: ``process.py``),
decides residency (server/residency.py: what must be unloaded for a model to fit,
idle unloads; on-demand loads: ``waiting.OnDemand``), measures what a model holds (after its load, and
after each job or lease: its peak), restarts a model whose process was lost, and lends
models to the upscaler and to ``/api/upscale`` jobs (``leases.Leases``): a leased
model stays loaded, and a lease waits for a load in progress on an event, never a poll.

The claim loops are the worker's (``loop.py``): the host tells it when a model is
ready to take jobs (``on_ready``) and when it must stop taking them (``on_stopping``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from .. import hostmem
from ..backends import check_extra, create_backend
from ..backends.base import Backend, BackendError, free_memory
from ..backends.memory import load_and_measure, model_device
from ..broker.base import Broker
from ..errors import Conflict
from ..families import runs_isolated
from ..features import FITS
from ..forecast import prior_vector
from ..residency import NoRoom, Residency, TooBig, record_peak, shares_device, too_big
from .leases import Leases
from .process import ModelProcess
from .waiting import OnDemand, cancel_waiting, fail_waiting, nobody_else

if TYPE_CHECKING:
    from ..config import Settings
    from ..metrics import Metrics
    from ..registry import ModelState, Registry, State

log = logging.getLogger("easel")
KILLED_CALL_WAIT = 30.0  # seconds a killed model process's blocked call gets to return


class ModelHost:
    def __init__(
        self, settings: Settings, registry: Registry, broker: Broker, metrics: Metrics,
        announce: Callable[[str], Awaitable[None]], running_models: Callable[[], set[str]],
    ) -> None:  # fmt: skip
        self.settings = settings
        self.registry = registry
        self.broker = broker
        self.metrics = metrics
        self.announce = announce  # presence of a model changed (heartbeat now)
        self.running_models = running_models  # models with a job running here
        self.on_ready: Callable[[ModelState], None] = lambda ms: None  # set by the worker: start taking jobs
        self.on_stopping: Callable[[str], Awaitable[None]] = _nothing  # set by the worker: stop taking jobs of a model
        self.residency = Residency(settings)
        self.accepting = True  # false once the worker stops: no on-demand loads
        self.hung: dict[str, str] = {}  # job id -> model: stalled in-process calls that have not returned
        self.loading = asyncio.Lock()  # one residency decision and load at a time (``load_locked``)
        self.on_demand = OnDemand(self)
        self._settled: dict[str, asyncio.Event] = {}  # set while a model is not loading
        self.leases = Leases(self)  # models lent to the upscaler and /api/upscale jobs
        self._grown: set[str] = set()  # models whose measured peak rose with their last job
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def alone(cls, settings: Settings) -> ModelHost:
        """A host with no worker around it (load, measure, unload: checks and benches)."""
        from ..broker import create_broker
        from ..metrics import Metrics
        from ..registry import Registry

        async def announce(model: str) -> None:
            return None

        return cls(settings, Registry(settings), create_broker(settings), Metrics(), announce, set)

    # ----- state (only here) ----------------------------------------------------------------

    def _set(self, ms: ModelState, state: State, error: str | None = None) -> None:
        ms.state, ms.load_error = state, error
        settled = self.settled(ms.name)
        settled.clear() if state == "loading" else settled.set()
        self.metrics.loaded.labels(ms.name).set(1 if state == "loaded" else 0)

    def settled(self, name: str) -> asyncio.Event:
        """Set while ``name`` is not loading (what a lease waits on)."""
        return self._settled.setdefault(name, asyncio.Event())

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    # ----- load / unload ------------------------------------------------------------------

    async def load(self, name: str) -> ModelState:
        """Load ``name``, first unloading idle models its device's budget needs room
        from: ``Conflict`` while busy models stand in the way; a model bigger than
        the budget ends in state error, saying by how much."""
        ms = self.registry.get(name)
        if ms.state in ("loaded", "loading"):
            return ms
        async with self.loading:
            return await self.load_locked(ms)

    async def load_locked(self, ms: ModelState) -> ModelState:
        """``load`` with ``loading`` held."""
        name = ms.name
        if ms.state in ("loaded", "loading"):
            return ms
        try:
            evict = self.residency.plan(ms, list(self.registry.models.values()), await self._busy())
        except TooBig as exc:
            self._set(ms, "error", str(exc))
            log.warning("model %s: %s", name, exc)
            await self.announce(name)
            return ms
        except NoRoom as exc:
            raise Conflict(str(exc), param="model", code="model_no_room") from None
        for other in evict:
            log.info("model %s: unloading idle model %s (least recently used) to make room", name, other)
            await self.unload(other)
        if name in self.hung.values():
            raise Conflict(
                f"model {name!r} is still in a hung pipeline call ({ms.load_error}); "
                "it is unloaded, then loaded again if enabled, when that call returns — or restart the server",
                param="model",
            )
        self._set(ms, "loading")  # at once: a caller that does not wait sees it
        await self.announce(name)
        await self._start(ms)
        if ms.state == "loaded" and ms.backend is not None:
            await self._check_budget(ms)
        if ms.state == "loaded" and ms.backend is not None:
            self.residency.touch(name)
            await self._publish_priors(ms, ms.backend)
            self.on_ready(ms)
        await self.announce(name)
        return ms

    async def _start(self, ms: ModelState) -> None:
        """Create and load the backend off the event loop; a failure is state, not a crash."""
        log.info("model %s: loading (backend %s%s)", ms.name, ms.cfg.backend, ", its own process" if runs_isolated(ms.cfg) else "")
        start = time.monotonic()
        try:
            backend, size = await anyio.to_thread.run_sync(self._create_and_load, ms)
        except Exception as exc:
            self._set(ms, "error", load_message(exc))
            log.warning("model %s: load failed: %s", ms.name, ms.load_error)
            if await nobody_else(self.broker, ms.name):  # jobs queued while it loaded would wait for ever
                await fail_waiting(self.broker, ms.name, ms.load_error or "the model failed to load")
            return
        took = time.monotonic() - start
        ms.load_seconds = took if ms.load_seconds is None else (ms.load_seconds * ms.loads + took) / (ms.loads + 1)
        ms.loads += 1
        ms.size_mib = size if size is not None else ms.size_mib
        ms.weights_mib = size
        ms.backend = backend
        ms.warm = False
        self._set(ms, "loaded")
        log.info("model %s: loaded in %.2fs (%s MiB)", ms.name, took, size if size is not None else "size unknown")

    def _create_and_load(self, ms: ModelState) -> tuple[Backend, float | None]:
        """The loaded backend and its measured size in MiB; a model in its own process
        measures itself (this process never touches its device)."""
        check_extra(ms.name, ms.cfg)  # one clean line, before a process is started for nothing
        if runs_isolated(ms.cfg):
            proc = ModelProcess(ms.name, ms.cfg, self.settings)
            proc.load()
            return proc, proc.size_mib
        backend = create_backend(ms.name, ms.cfg, self.settings)
        return backend, load_and_measure(backend, ms.name, ms.cfg)

    async def _publish_priors(self, ms: ModelState, backend: Backend) -> None:
        """The backend's forecast priors, before its first job (a configured prior wins)."""
        priors = {f: prior_vector(p).tolist() for f in FITS if (p := backend.cost_prior(f)) is not None}
        if priors and not ms.cfg.forecast_prior:
            await self.broker.set_priors(ms.name, priors)

    async def _check_budget(self, ms: ModelState) -> None:
        over = self.residency.over(ms, list(self.registry.models.values()))
        if over <= 0:
            return
        device = model_device(ms.cfg)
        budget = self.residency.budget(device)
        log.warning("model %s: measured %s MiB; the loaded models exceed their budget (%s MiB) by %.0f MiB", ms.name, ms.size_mib, budget, over)
        if ms.size_mib is not None and budget is not None and ms.size_mib > budget:
            await self._release(ms)
            self._set(ms, "error", str(too_big(ms.name, ms.size_mib, device, budget, measured=True)))

    async def unload(self, name: str) -> ModelState:
        ms = self.registry.get(name)
        if ms.state == "loading":
            raise Conflict(f"model {name!r} is still loading; unload it once it has loaded", param="model")
        await self.on_stopping(name)
        if not self.broker.distributed and not ms.cfg.load_on_demand:  # nobody else will serve them
            await cancel_waiting(self.broker, name, f"model {name!r} was unloaded before the job ran")
        await self._release(ms)
        self._set(ms, "unloaded")
        await self.announce(name)
        return ms

    async def _release(self, ms: ModelState) -> None:
        backend, ms.backend = ms.backend, None
        if backend is not None:
            await anyio.to_thread.run_sync(_release, backend)
            log.info("model %s: unloaded", ms.name)

    async def close(self) -> None:
        """The worker stops: every backend goes (their processes end)."""
        for ms in self.registry.models.values():
            if ms.backend is not None:
                await self._release(ms)
                self._set(ms, "unloaded")

    # ----- after a job ---------------------------------------------------------------------

    def job_ended(self, ms: ModelState, backend: Backend) -> None:
        """On the model's thread, right after a job's pipeline calls: cached blocks back
        to the device when another model shares it, and the model's size raised to its
        measured peak (the budget counts what it really holds)."""
        models = list(self.registry.models.values())
        try:
            peak = backend.after_job(shares_device(ms, models))
        except BackendError as exc:
            log.warning("model %s: could not measure it after a job (%s)", ms.name, exc)
            return
        if peak is not None and record_peak(ms, peak, models):
            self._grown.add(ms.name)

    async def warmed(self, ms: ModelState) -> None:
        """Its first job ran: forecasts behind it no longer count the first call's set-up."""
        if not ms.warm:
            ms.warm = True
            await self.announce(ms.name)

    async def check_fit(self, ms: ModelState) -> None:
        """After a job raised ``ms``'s size: idle models on its device go if the budget
        is now exceeded (least recently used first)."""
        if ms.name not in self._grown:
            return
        self._grown.discard(ms.name)
        models = list(self.registry.models.values())
        if self.residency.over(ms, models) <= 0:
            return
        for other in self.residency.make_room(ms, models, await self._busy()):
            log.info("model %s: its measured peak leaves no room for idle model %s; unloading it", ms.name, other)
            await self.unload(other)

    # ----- restarts -----------------------------------------------------------------------

    def restart(self, ms: ModelState, why: str) -> None:
        """The model's process was lost (a device fault, or killed): it takes no job
        until a new process has loaded (now, on a task)."""
        if ms.state != "loaded":
            return
        log.warning("model %s: starting its process again (%s)", ms.name, why)
        self._set(ms, "loading")
        self.spawn(self._restart(ms))

    async def _restart(self, ms: ModelState) -> None:
        await self.on_stopping(ms.name)
        await self._release(ms)
        await self.announce(ms.name)
        async with self.loading:
            await self._start(ms)
        if ms.state == "loaded":
            self.on_ready(ms)
        await self.announce(ms.name)

    async def after_stall(self, ms: ModelState, job_id: str, work: asyncio.Future[Any]) -> None:
        """A job of ``ms`` stalled (its record is already ended).  A model in its own
        process is killed and started again; an in-process model is marked error, and
        unloaded (then loaded again if enabled) once the hung call returns."""
        backend = ms.backend
        if isinstance(backend, ModelProcess):
            log.warning("model %s: killing its process (pid %s) after a stalled job, then starting it again", ms.name, backend.pid)
            backend.kill()
            await asyncio.wait((work,), timeout=KILLED_CALL_WAIT)
            if work.done():
                self.restart(ms, f"job {job_id} stalled")
                return
            error = f"model {ms.name!r} could not be restarted after a stalled job: its blocked call did not return; load it again"
        else:
            self.hung[job_id] = ms.name
            error = (
                f"model {ms.name!r} stalled: job {job_id} reported no step in time and its pipeline call is still hung; "
                "the model is unloaded when that call returns" + (", then loaded again (enabled)" if ms.cfg.enabled else "")
                + " — or restart the server"
            )  # fmt: skip
        self._set(ms, "error", error)  # first: the recovery below must find it so, however soon the call returns
        log.error("%s", error)
        await self.on_stopping(ms.name)
        if not isinstance(backend, ModelProcess):
            self.spawn(self._recover(ms, job_id, work))
        await self.announce(ms.name)

    async def _recover(self, ms: ModelState, job_id: str, work: asyncio.Future[Any]) -> None:
        await asyncio.wait((work,))
        self.hung.pop(job_id, None)
        if ms.state != "error" or ms.name in self.hung.values():
            return  # changed meanwhile, or another call of the model still hangs
        log.info("model %s: the hung call of job %s returned; unloading the model", ms.name, job_id)
        await self._release(ms)
        self._set(ms, "unloaded")
        if ms.cfg.enabled and self.accepting:
            await self.load(ms.name)
        else:
            await self.announce(ms.name)

    def device_fault(self, ms: ModelState, message: str) -> None:
        """A device fault in this process (``isolate: false``): CUDA's context is broken
        for good, so the model takes no more jobs until the server restarts."""
        self._set(ms, "error", f"model {ms.name!r} hit a device fault ({message}); restart the server (or set isolate: true)")
        log.error("%s", ms.load_error)
        self.spawn(self.on_stopping(ms.name))
        self.spawn(self.announce(ms.name))

    # ----- residency -----------------------------------------------------------------------

    async def _busy(self) -> set[str]:
        """Models with waiting or running jobs, or lent out (never evicted)."""
        busy = self.running_models() | self.leases.held()
        for name, ms in self.registry.models.items():
            if name not in busy and ms.state == "loaded" and (await self.broker.depth(name)) != (0, 0):
                busy.add(name)
        return busy

    async def tick(self) -> None:
        """Each heartbeat: unload models idle past ``idle_unload_seconds``; load the
        on-demand models whose queue holds jobs (in Redis mode, any worker host may)."""
        busy = await self._busy()
        for name, ms in list(self.registry.models.items()):
            limit = ms.cfg.idle_unload_seconds
            if ms.state == "loaded" and limit is not None and name not in busy and self.residency.idle_for(name) >= limit:
                log.info("model %s: idle for %.1fs (idle_unload_seconds %g); unloading it", name, self.residency.idle_for(name), limit)
                await self.unload(name)
            elif ms.cfg.load_on_demand and ms.state == "unloaded" and (await self.broker.depth(name))[0] > 0:
                self.on_demand.want(name)
        self.on_demand.retry()


async def _nothing(name: str) -> None:
    return None


def _release(backend: Backend) -> None:
    backend.unload()
    del backend
    free_memory()
    hostmem.trim()  # the freed weights' pages, kept by the malloc settings, go back too


def load_message(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, OSError)) and "model_index.json" in text:
        return f"model folder is not a Diffusers pipeline (no model_index.json): {text}"
    return text if len(text) < 600 else text[:600] + "..."
