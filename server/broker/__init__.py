"""The broker seam (``base.Broker``) and its two implementations: ``memory`` (one
process, the default) and ``redis`` (API nodes and workers sharing one Redis)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Broker

if TYPE_CHECKING:
    from ..config import Settings


def create_broker(settings: Settings) -> Broker:
    """The broker ``settings.broker.url`` names (redis-py is imported only for Redis)."""
    url = settings.broker.url
    queue = settings.queue
    if url == "memory":
        from .memory import MemoryBroker

        return MemoryBroker(result_ttl=queue.result_ttl_seconds, result_memory_bytes=queue.result_memory_mib * 2**20)
    from .redis import RedisBroker

    all_events = settings.broker.role != "worker"  # a worker-only process needs submit/cancel/command only
    return RedisBroker(
        url,
        result_ttl=queue.result_ttl_seconds,
        prefix=settings.broker.prefix,
        all_events=all_events,
        timeout=settings.broker.timeout_seconds,
    )
