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


def unreachable(url: str) -> str | None:
    """Why the broker at ``url`` cannot be reached now (None: it answers), for one clean
    line at start-up instead of a traceback from inside the server."""
    if url == "memory":
        return None
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        return f"cannot reach the broker at {redact(url)}: {str(exc).rstrip('.')}"
    finally:
        client.close()
    return None


def redact(url: str) -> str:
    """``url`` without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user + ':***' if user else '***'}@{host}"
