"""The workers a node's service talks to, in two small classes:

* ``LocalWorkers`` — one process (the memory broker): the worker of this process is
  all there is, its models' states are the truth, and a model that is neither loaded,
  loading nor loaded on demand takes no job (409);
* ``SharedWorkers`` — a shared broker (Redis): workers anywhere report their presence
  (this process's own worker among them, if it runs one); a job may be queued for any
  configured model, since a worker may come later.

``Service`` picks one at construction; nothing else asks which it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import Conflict
from .worker.presence import SLOTS

if TYPE_CHECKING:
    from .broker.base import Broker, WorkerInfo
    from .registry import ModelState
    from .standing import Forecasts
    from .worker.loop import Worker

Presence = tuple[str, str | None, list["WorkerInfo"]]  # (state, load error, the workers that present the model)


def across(infos: list[WorkerInfo]) -> tuple[str, str | None]:
    """(state, load error) of a model over the workers that present it: loaded if any
    is, else loading, else error, else unloaded."""
    states = {w.state for w in infos}
    for state in ("loaded", "loading", "error"):
        if state in states:
            return state, next((w.load_error for w in infos if w.load_error), None) if state == "error" else None
    return "unloaded", None


class LocalWorkers:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def presence(self, models: list[ModelState]) -> list[Presence]:
        own = self.worker.presence.infos()  # one instant for every model
        return [(ms.state, ms.load_error, [i for i in own if i.model == ms.name]) for ms in models]

    async def slots(self, ms: ModelState) -> tuple[str, str | None, int]:
        return ms.state, ms.load_error, SLOTS if ms.state == "loaded" else 0

    def check_served(self, ms: ModelState) -> None:
        if ms.state == "loading" or ms.state == "loaded" or (ms.state == "unloaded" and ms.cfg.load_on_demand):
            return  # it runs once the model has loaded (on demand: ModelHost.want); a failed load ends it as error
        hint = f": {ms.load_error}" if ms.state == "error" else ""
        raise Conflict(
            f"model {ms.name!r} is {ms.state}{hint}; load it with POST /v1/admin/models/{ms.name}/load",
            param="model",
            code="model_not_loaded",
        )

    async def load(self, name: str, wait: bool) -> None:
        host = self.worker.host
        if wait:
            await host.load(name)
        else:
            host.spawn(host.load(name))

    async def unload(self, name: str) -> None:
        await self.worker.host.unload(name)

    def queued(self, model: str) -> None:
        self.worker.host.on_demand.want(model)  # a load_on_demand model that is not loaded loads now


class SharedWorkers:
    def __init__(self, broker: Broker, forecasts: Forecasts, worker: Worker | None) -> None:
        self.broker = broker
        self.forecasts = forecasts
        self.worker = worker  # this process's own, if it runs one (role all)

    async def presence(self, models: list[ModelState]) -> list[Presence]:
        """Every read from the broker comes first; this process's own worker is then read
        at one instant for all of them, so a listing never shows one model still loaded
        and the one that evicted it already loading."""
        shared = {ms.name: await self.forecasts.workers(ms.name) for ms in models}
        own = self.worker.presence.infos() if self.worker is not None else []  # no await from here on
        mine = self.worker.id if self.worker is not None else None
        out: list[Presence] = []
        for ms in models:
            infos = [w for w in shared[ms.name] if w.worker != mine] + [i for i in own if i.model == ms.name]
            out.append((*across(infos), infos))
        return out

    async def slots(self, ms: ModelState) -> tuple[str, str | None, int]:
        state, error, infos = (await self.presence([ms]))[0]
        return state, error, sum(w.slots for w in infos if w.state == "loaded")

    def check_served(self, ms: ModelState) -> None:
        return None  # workers may come later: the queue survives until one does

    async def load(self, name: str, wait: bool) -> None:
        if self.worker is not None:  # this node's own worker (role all)
            await LocalWorkers(self.worker).load(name, wait)
        else:
            await self.broker.command(name, "load")

    async def unload(self, name: str) -> None:
        if self.worker is not None:
            await self.worker.host.unload(name)
        else:
            await self.broker.command(name, "unload")

    def queued(self, model: str) -> None:
        if self.worker is not None:
            self.worker.host.on_demand.want(model)
