"""Jobs waiting for a model this worker hosts.

``OnDemand``: a model with ``load_on_demand`` loads when a job for it waits, as room
allows (tried again as jobs end and at every heartbeat).  The functions: what becomes of
the waiting jobs when no worker can load their model, or the server shuts down first.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..broker.base import Broker
from ..errors import Conflict
from ..jobs import JobStatus

if TYPE_CHECKING:
    from .host import ModelHost

log = logging.getLogger("easel")


class OnDemand:
    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self.wanted: set[str] = set()  # on-demand models waiting for room

    def want(self, model: str) -> None:
        """A job for ``model`` waits: load it if it loads on demand and is not loaded
        (on a task: the caller does not wait)."""
        ms = self.host.registry.models.get(model)
        if ms is None or not ms.cfg.load_on_demand or ms.state != "unloaded" or not self.host.accepting:
            return
        self.wanted.add(model)
        self.retry()

    def retry(self) -> None:
        if self.wanted and not self.host.loading.locked():
            self.host.spawn(self._load_wanted())

    async def _load_wanted(self) -> None:
        """Load the on-demand models that have waiting jobs, as room allows."""
        host = self.host
        async with host.loading:
            for name in list(self.wanted):
                ms = host.registry.models[name]
                if ms.state != "unloaded" or not host.accepting or (await host.broker.depth(name))[0] == 0:
                    self.wanted.discard(name)
                    continue
                try:
                    ms = await host.load_locked(ms)
                except Conflict as exc:  # busy models in the way: retried as jobs end
                    log.info("model %s: waiting for room (%s)", name, exc)
                    continue
                self.wanted.discard(name)
                if ms.state == "error" and await nobody_else(host.broker, name):
                    await fail_waiting(host.broker, name, ms.load_error or "the model failed to load")


async def nobody_else(broker: Broker, model: str) -> bool:
    """No worker (this one included) can serve ``model``: one process, or every live
    worker that presents it reports a load error."""
    if not broker.distributed:
        return True
    return all(w.state == "error" for w in await broker.workers(model))


async def fail_waiting(broker: Broker, model: str, message: str) -> None:
    """Every waiting job of ``model`` ends as error: the model cannot be loaded."""
    for job in await broker.waiting(model, 2**31):
        fields = {"message": f"model {model!r} could not be loaded for this job: {message}"}
        if await broker.finish(job, JobStatus.ERROR, fields, attempt=None, blobs={}, only_waiting=True):
            log.info("job %s on %s: error (%s)", job.id, model, message)


async def cancel_waiting(broker: Broker, model: str, message: str) -> None:
    """Every waiting job of ``model`` is cancelled (the server shuts down before it ran)."""
    for job in await broker.waiting(model, 2**31):
        await broker.cancel(job.id, message)
        log.info("job %s on %s: cancelled (%s)", job.id, model, message)
