"""Readiness (``/readyz``), apart from liveness (``/healthz``), as Kubernetes expects.

A node is ready when it can do its work: an API node reaches its broker (each
probe pings it, so a lost Redis shows at the next probe); a node with workers
(role ``all`` or ``worker``) also has each enabled model loaded.  A model that
loaded once and was unloaded since (``idle_unload_seconds``, a residency budget)
or that loads on demand still counts as ready: the next job loads it.  Worker
state is read, never changed (``ModelState.state`` of the registry)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .broker.base import BrokerUnavailable
from .schemas import Readiness

if TYPE_CHECKING:
    from .registry import ModelState
    from .service import Service


async def readiness(service: Service) -> Readiness:
    problems: list[str] = []
    timeout = service.settings.broker.heartbeat_seconds  # a probe answers within one heartbeat
    try:
        await asyncio.wait_for(service.broker.ping(), timeout)
        broker = "ok"
    except (BrokerUnavailable, TimeoutError) as exc:
        broker = str(exc) or f"{service.broker.name} did not answer within {timeout:g} s"
        problems.append(f"broker: {broker}")
    models: dict[str, str] = {}
    if service.worker is not None:
        for ms in service.models():
            if ms.cfg.enabled:
                models[ms.name] = ms.state
                if (why := _not_ready(ms)) is not None:
                    problems.append(f"model {ms.name}: {why}")
    return Readiness(status="ready" if not problems else "not_ready", broker=broker, models=models, problems=problems)


def _not_ready(ms: ModelState) -> str | None:
    if ms.state == "loaded" or (ms.state == "unloaded" and (ms.loads > 0 or ms.cfg.load_on_demand)):
        return None
    if ms.state == "error":
        return f"failed to load: {ms.load_error}"
    return f"{ms.state} (an enabled model is ready once it has loaded)"
