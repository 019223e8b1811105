"""A worker's presence in the broker: what it serves, the leases of its running jobs,
and the reaper.

Every ``heartbeat_seconds`` it tells the broker each model's state here (the
forecasts of every API node read it), renews the leases of the running jobs, stops
the jobs the broker says to stop (cancelled on another node, or lost to another
worker), runs the broker's reaper (the jobs of dead workers go back to the queue)
and lets the model host apply residency (idle unloads, on-demand loads).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..broker.base import Broker, BrokerUnavailable, WorkerInfo

if TYPE_CHECKING:
    from ..config import Settings
    from ..registry import Registry

log = logging.getLogger("easel")
SLOTS = 1  # jobs a model runs at once here: one pipeline call at a time (batches will raise what one call holds)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Presence:
    def __init__(
        self, settings: Settings, broker: Broker, registry: Registry, worker: str,
        running: Callable[[], list[tuple[str, str, int]]], stop_job: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.settings = settings
        self.broker = broker
        self.registry = registry
        self.id = worker
        self.running = running  # (job id, model, attempt) of each job running here
        self.stop_job = stop_job  # the broker says: stop this job (cancelled elsewhere, or lost)
        self.tick: Callable[[], Awaitable[None]] | None = None  # each beat after the reaper (residency)
        self.on_change: list[Callable[[str], Any]] = []  # called with a model name when its presence here changes
        self._beat: asyncio.Task[None] | None = None

    def infos(self) -> list[WorkerInfo]:
        counts: dict[str, int] = {}
        for _, model, _ in self.running():
            counts[model] = counts.get(model, 0) + 1
        return [
            WorkerInfo(
                worker=self.id, model=ms.name, host=socket.gethostname(), state=ms.state, load_error=ms.load_error,
                slots=SLOTS, running=counts.get(ms.name, 0), load_seconds=ms.load_seconds,
                cold=ms.state == "loaded" and not ms.warm,
            )
            for ms in self.registry.models.values()
        ]  # fmt: skip

    async def announce(self, model: str) -> None:
        """The presence of ``model`` here changed: tell the broker now."""
        try:
            await self.beat_once()
        except BrokerUnavailable:
            log.warning("the broker is unreachable; the presence of model %s will be sent with the next heartbeat", model)
        for callback in self.on_change:
            callback(model)

    async def beat_once(self) -> None:
        running = [(job_id, attempt) for job_id, _, attempt in self.running()]
        for job_id in await self.broker.heartbeat(self.infos(), running, self.settings.broker.lease_seconds):
            self.stop_job(job_id)

    def start(self) -> None:
        self._beat = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        try:
            await self.broker.leave(self.id)
        except BrokerUnavailable:
            pass

    async def _loop(self) -> None:
        beat = self.settings.broker.heartbeat_seconds
        while True:
            await asyncio.sleep(beat)
            try:
                await self.beat_once()
                await self.broker.reap()
                if self.tick is not None:
                    await self.tick()
            except BrokerUnavailable as exc:
                log.warning("heartbeat: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
