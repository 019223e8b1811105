"""The broker seam (``base.Broker``) and its two implementations: ``memory`` (one
process, the default) and ``redis`` (API nodes and workers sharing one Redis)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Broker

if TYPE_CHECKING:
    from ..config import Settings

WORKER_TIMEOUT = 10.0  # seconds a worker-only process waits for Redis at least


def create_broker(settings: Settings) -> Broker:
    """The broker ``settings.broker.url`` names (redis-py is imported only for Redis)."""
    url = settings.broker.url
    queue = settings.queue
    if url == "memory":
        from .memory import MemoryBroker

        return MemoryBroker(result_ttl=queue.result_ttl_seconds, result_memory_bytes=queue.result_memory_mib * 2**20)
    from .redis import RedisBroker

    all_events = settings.broker.role != "worker"  # a worker-only process needs submit/cancel/command only
    timeout = settings.broker.timeout_seconds
    if settings.broker.role == "worker":  # nobody waits on a worker's answer: a stall it outlasts loses no result
        timeout = max(timeout, WORKER_TIMEOUT)
    return RedisBroker(url, result_ttl=queue.result_ttl_seconds, prefix=settings.broker.prefix, all_events=all_events, timeout=timeout)
