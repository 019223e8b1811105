"""Time limits of a running job: the watchdog the worker starts beside each one.

* ``job_timeout_seconds``: a job running longer is stopped at its next step and ends
  as an error (the worker sets its cancel event with a reason).
* ``stall_seconds``: a job that reports no step for this long is stalled: its
  pipeline call is presumed hung, and the worker ends the job without waiting for it.

Both are set in ``limits`` and per model (``models.NAME.*``: null = the limits'
value, 0 = no limit for that model).  A training run has no job timeout (it stops
at its own ``max_steps``); the stall limit applies to it too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings


@dataclass(frozen=True)
class Limit:
    seconds: float
    key: str  # the setting it comes from, for the message


def job_limit(settings: Settings, model: str, name: str) -> Limit | None:
    """Limit ``name`` (``job_timeout_seconds`` or ``stall_seconds``) of ``model``'s jobs."""
    cfg = settings.models.get(model)
    own: float | None = getattr(cfg, name) if cfg is not None else None
    if own is not None:
        return Limit(own, f"models.{model}.{name}") if own > 0 else None
    value: float | None = getattr(settings.limits, name)
    return Limit(value, f"limits.{name}") if value is not None else None


def timeout_message(limit: Limit) -> str:
    return (
        f"the job ran past {limit.seconds:g} s, the time limit set by {limit.key}; "
        f"raise {limit.key} (or ask for fewer steps, images or pixels) to let it finish"
    )


def stall_message(limit: Limit, model: str, isolated: bool) -> str:
    then = (
        "its model process was killed and restarted"
        if isolated
        else f"model {model!r} is marked error until the hung call returns"
    )
    return (
        f"the job stalled: it reported no step for {limit.seconds:g} s ({limit.key}); {then}. "
        f"If the model is just slow per step, raise {limit.key}"
    )


async def watch(
    started: float,
    last_step: Callable[[], float],
    timeout: Limit | None,
    stall: Limit | None,
    on_timeout: Callable[[], None],
) -> None:
    """Watch one running job (monotonic clock): call ``on_timeout`` once when it runs
    past ``timeout``; return when it has stalled (no step for ``stall``). Without a
    stall limit it never returns: cancel it when the job ends."""
    while True:
        now = time.monotonic()
        waits: list[float] = []
        if timeout is not None:
            left = started + timeout.seconds - now
            if left <= 0:
                on_timeout()
                timeout = None
            else:
                waits.append(left)
        if stall is not None:
            left = last_step() + stall.seconds - now
            if left <= 0:
                return
            waits.append(left)
        if not waits:
            await asyncio.Event().wait()  # nothing left to watch: until cancelled
            continue
        await asyncio.sleep(min(waits) + 0.01)
