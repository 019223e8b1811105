"""A job's timing as the worker measures it and as a running job's status reads it:
``CallTimes`` (when each pipeline call started, reported its steps and returned),
``measured_phases`` (the head, steps and tail seconds the forecast learns from, see
``forecast.py``) and ``running_remaining`` (a running job's time left: its own step
rate and the learned tail)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class CallTimes:
    """When one pipeline call started, reported its steps and returned (``time.monotonic``)."""

    start: float
    steps: list[float] = field(default_factory=list)
    end: float | None = None


def measured_phases(calls: Sequence[CallTimes], seconds: float) -> tuple[float, float, float] | None:
    """(head, steps, tail) seconds of a job that took ``seconds`` of worker time, or
    None when its steps cannot be timed (a call reported fewer than two).  The steps
    phase is the median gap between steps times the steps (a gap that spans a preview
    or a second pipeline call inside one backend call does not count as a step);
    the tail is from the last step to the call's return; the head is the rest."""
    if not calls:  # a training run: no pipeline calls to time
        return None
    denoise = tail = 0.0
    for call in calls:
        if len(call.steps) < 2 or call.end is None:
            return None
        gaps = [b - a for a, b in zip(call.steps, call.steps[1:], strict=False)]
        denoise += statistics.median(gaps) * len(call.steps)
        tail += call.end - call.steps[-1]
    head = seconds - denoise - tail
    if head < 0:  # the first step was quicker than the median: no head to speak of
        denoise += head
        head = 0.0
    return head, max(0.0, denoise), max(0.0, tail)


def running_remaining(
    now: float,
    started_at: float,
    predicted: float,
    step: int,
    total_steps: int,
    last_step_at: float | None,
    first_step_at: float | None = None,
    phases: Sequence[float] = (),
) -> float:
    """Seconds left for a running job.

    Before the first step: the prediction minus the time already spent.  After it:
    the steps still to go at the job's own measured rate (from its first step to its
    last; after one step, the forecast rate), plus the learned tail (decoding), minus
    the time since the last step.
    """
    if step <= 0 or last_step_at is None or total_steps <= 0:
        return max(0.0, predicted - (now - started_at))
    head, steps, tail = phases if len(phases) == 3 else (0.0, 0.0, 0.0)
    if step >= 2 and first_step_at is not None:
        per_step = (last_step_at - first_step_at) / (step - 1)
    elif steps > 0:
        per_step = steps / total_steps
    else:  # a record without phases (an older version): all of it was steps
        per_step = (last_step_at - started_at) / step
    return max(0.0, per_step * (total_steps - step) + tail - (now - last_step_at))
