"""The drainer of the broker's delivery outbox: every node runs one.

Jobs that ended with a webhook or uploads to deliver wait in the broker's outbox
(``Broker.claim_deliveries``); this loop claims the due ones and delivers them
(``Delivery.run``), so a job's webhook is sent whichever node ended it (a worker, the
reaper, a cancel on an API node) and is sent again after a receiver or broker
outage, or a node that died mid-delivery (its claim runs out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..broker.base import Broker, BrokerUnavailable
from .hooks import Delivery, claim_seconds

log = logging.getLogger("easel")
POLL_SECONDS = 0.5  # how often an idle drainer looks for due entries
BATCH = 16  # entries claimed (and delivered concurrently) at once


class Outbox:
    def __init__(self, delivery: Delivery, broker: Broker, poll: float = POLL_SECONDS) -> None:
        self.delivery = delivery
        self.broker = broker
        self.poll = poll

    async def drain_forever(self) -> None:
        backoff = self.poll
        while True:
            try:
                await self.delivery.record_pending()
                ids = await self.broker.claim_deliveries(claim_seconds(self.delivery.cfg), BATCH)
                backoff = self.poll
                if ids:
                    results = await asyncio.gather(*(self.delivery.run(i) for i in ids), return_exceptions=True)
                    for job_id, res in zip(ids, results, strict=True):
                        if isinstance(res, BrokerUnavailable):
                            log.warning("delivery of job %s: outcome not recorded yet (%s)", job_id, res)
                        elif isinstance(res, BaseException):
                            log.error("delivery of job %s failed", job_id, exc_info=res)
                    continue  # more may be due
            except BrokerUnavailable as exc:
                log.warning("delivery outbox: %s", exc)
                backoff = min(5.0, backoff * 2)
            except Exception:
                log.exception("delivery outbox")
            await asyncio.sleep(backoff)

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.drain_forever())


async def stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
