"""Models lent by the model host: the upscaler to a generation that asked for
``upscale`` (``outcome.py``), and to ``/api/upscale`` jobs from their submission until
they end (``upscaling.py``).  A leased model stays loaded (residency never evicts it);
a lease waits for a load in progress on an event, never a poll; when the last lease of
a model without ``keep_loaded`` ends, the model is unloaded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio.to_thread

from ..backends.base import Backend, BackendError

if TYPE_CHECKING:
    from .host import ModelHost

log = logging.getLogger("easel")


class Leases:
    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self._count: dict[str, int] = {}  # model -> leases held
        self._of_job: dict[str, str] = {}  # job id -> model it holds (an /api/upscale job)

    def held(self) -> set[str]:
        """The models lent out now."""
        return {name for name, count in self._count.items() if count > 0}

    async def acquire(self, name: str, job_id: str | None = None) -> Backend:
        """Load ``name`` here if needed and hold it loaded until ``release`` (or, with
        ``job_id``, until that job ends: ``release_job``)."""
        ms = self.host.registry.get(name)
        self._count[name] = self._count.get(name, 0) + 1
        try:
            await self.host.load(name)
            await self.host.settled(name).wait()  # a load in progress finishes
            if ms.state != "loaded" or ms.backend is None:
                raise BackendError(f"model {name!r} could not be loaded: {ms.load_error or ms.state}")
        except BaseException:
            await self.release(name)
            raise
        if job_id is not None:
            self._of_job[job_id] = name
        return ms.backend

    async def release(self, name: str) -> None:
        self._count[name] -= 1
        ms = self.host.registry.get(name)
        if self._count[name] == 0 and not ms.cfg.keep_loaded and ms.state == "loaded":
            log.info("model %s: its last lease ended; unloading it (keep_loaded is false)", name)
            await self.host.unload(name)

    async def release_job(self, job_id: str) -> None:
        """A job that held a model (``acquire(name, job_id)``) has ended."""
        name = self._of_job.pop(job_id, None)
        if name is not None:
            await self.release(name)

    @asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Backend]:
        """``acquire`` / ``release`` around one use; what the use held at its peak counts after it."""
        backend = await self.acquire(name)
        try:
            yield backend
        finally:
            try:
                ms = self.host.registry.get(name)
                self.host.residency.touch(name)
                await anyio.to_thread.run_sync(self.host.job_ended, ms, backend)
                await self.host.check_fit(ms)
            finally:
                await self.release(name)
