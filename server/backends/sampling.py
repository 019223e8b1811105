"""A job's sampler on a Diffusers pipeline: the scheduler ``server/samplers.py`` names,
made for the call from the pipeline's own scheduler config
(``SchedulerClass.from_config(pipe.scheduler.config, **flags)``) and in place only
for the call.

The model host makes one call into a backend at a time (``backends.base.Backend``),
so the pipeline's ``scheduler`` is the job's while its call runs and the loaded one
again when it returns or fails: the next job, with another sampler or none, gets the
model's own.  A job without a sampler runs the loaded scheduler itself, as before.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..samplers import Unsupported, choose
from .base import BackendError

if TYPE_CHECKING:
    from collections.abc import Iterator


def make_scheduler(pipe: Any, backend: str, sampler: str | None, scheduler: str | None) -> Any | None:
    """The scheduler of a job (None: the pipeline's own)."""
    try:
        choice = choose(backend, sampler, scheduler)
    except Unsupported as exc:  # checked at submission; a job stored by another easel version
        raise BackendError(str(exc)) from None
    if choice.sampler is None:
        return None
    import diffusers

    cls = getattr(diffusers, choice.sampler.scheduler)
    return cls.from_config(pipe.scheduler.config, **choice.flags)


@contextmanager
def scheduler_for(pipe: Any, backend: str, sampler: str | None, scheduler: str | None) -> Iterator[Any]:
    """``pipe`` running the job's scheduler while the block runs (yields the scheduler used)."""
    made = make_scheduler(pipe, backend, sampler, scheduler)
    if made is None:
        yield pipe.scheduler
        return
    own = pipe.scheduler
    pipe.scheduler = made
    try:
        yield made
    finally:
        pipe.scheduler = own
