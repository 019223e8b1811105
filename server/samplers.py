"""Samplers and schedules: A1111's names -> Diffusers schedulers, per model family.

One table of the facts.  ``/sdapi/v1/samplers`` and ``/schedulers`` list it, the
build validates a request's ``sampler`` / ``scheduler`` against it (``choose``), and
the Diffusers backends make the job's scheduler from it
(``SchedulerClass.from_config(pipe.scheduler.config, **flags)``, per job: the loaded
pipeline's own scheduler is never changed for other jobs).

A sampler is A1111's (``Euler a``, ``DPM++ 2M``, ...); a schedule is A1111's
``scheduler`` field (``karras``, ``exponential``, ...), which becomes the scheduler's
sigma/spacing flags.  ``automatic`` is what A1111 1.10 means by it: the sampler's own
default schedule (``DPM++ 2M``: Karras; ``DPM++ 2M SDE``: Exponential), else the
model's (its scheduler config as shipped).  A1111's older names that carry the
schedule (``DPM++ 2M Karras``) are split as A1111 splits them.

Only what has a Diffusers counterpart that runs on the family is listed (a test runs
every pair on the tiny pipelines): ``DPM++ SDE`` needs the ``torchsde`` package (not
installed with easel), ``DPM++ 2S a``, ``DPM fast``, ``DPM adaptive``, ``Restart``
and ``DDIM CFG++`` have none.  Flow-matching families (FLUX.2-klein, Z-Image,
Qwen-Image) run ``FlowMatchEulerDiscreteScheduler``: ``Euler``, with their own
(shifted) schedule or Karras / Exponential sigmas.

Nothing here imports Diffusers: API nodes without torch validate and list too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .families import FAMILIES

AUTOMATIC = "automatic"
NO_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}


@dataclass(frozen=True)
class Schedule:
    name: str  # A1111's id (the API's scheduler value)
    label: str  # A1111's label (infotext "Schedule type")
    flags: dict[str, Any] = field(default_factory=dict)  # scheduler config overrides
    aliases: tuple[str, ...] = ()


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule(AUTOMATIC, "Automatic"),
        # k-diffusion's uniform: timesteps evenly spaced from the last to the first
        Schedule("uniform", "Uniform", {**NO_SIGMAS, "timestep_spacing": "linspace"}),
        Schedule("karras", "Karras", {**NO_SIGMAS, "use_karras_sigmas": True}),
        Schedule("exponential", "Exponential", {**NO_SIGMAS, "use_exponential_sigmas": True}),
        # SGM's: n evenly spaced timesteps from the last, the first left out (Diffusers' "trailing")
        Schedule("sgm_uniform", "SGM Uniform", {**NO_SIGMAS, "timestep_spacing": "trailing"}, ("SGMUniform",)),
    )
}
SPACING = ("uniform", "sgm_uniform")  # schedulers without sigma flags take these
SIGMAS = ("uniform", "karras", "exponential", "sgm_uniform")
FLOW_SIGMAS = ("karras", "exponential")  # flow matching: the shifted sigmas, converted


@dataclass(frozen=True)
class Sampler:
    name: str  # A1111's label
    scheduler: str  # the Diffusers scheduler class
    flags: dict[str, Any] = field(default_factory=dict)  # its config overrides
    schedules: tuple[str, ...] = SIGMAS  # the schedules it takes besides automatic
    default: str = ""  # the schedule automatic means (A1111's sampler option); "": the model's
    aliases: tuple[str, ...] = ()
    # (a, b): its pipeline runs a * n + b timesteps for n steps, each a model evaluation and a reported step
    # (Heun, DPM2: second order, 2n - 1; PLMS: n + 1, its second-to-last timestep twice)
    timesteps: tuple[int, int] = (1, 0)


# UNet (epsilon / v-prediction) families: the names A1111 1.10 lists, in its order
EPSILON = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
            default="karras", aliases=("k_dpmpp_2m",)),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
            default="exponential", aliases=("k_dpmpp_2m_sde",)),
    Sampler("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
            default="exponential", aliases=("k_dpmpp_2m_sde_heun",)),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
            default="exponential", aliases=("k_dpmpp_3m_sde",)),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", schedules=SPACING, aliases=("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",)),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",), timesteps=(2, -1)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", default="karras", aliases=("k_dpm_2",), timesteps=(2, -1)),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", default="karras", aliases=("k_dpm_2_a",), timesteps=(2, -1)),
    Sampler("DDIM", "DDIMScheduler", schedules=SPACING, aliases=("ddim",)),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, schedules=SPACING, aliases=("plms",), timesteps=(1, 1)),
    Sampler("UniPC", "UniPCMultistepScheduler"),
    Sampler("LCM", "LCMScheduler", schedules=(), aliases=("k_lcm",)),
)  # fmt: skip
FLOW = (Sampler("Euler", "FlowMatchEulerDiscreteScheduler", schedules=FLOW_SIGMAS, aliases=("k_euler", "flowmatch_euler")),)
TABLES: dict[str, tuple[Sampler, ...]] = {"epsilon": EPSILON, "flow": FLOW, "": ()}  # families.Family.sampling


class Unsupported(ValueError):
    """A sampler or schedule the model's family does not run; the message lists what it does."""

    def __init__(self, message: str, param: str, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def samplers(backend: str) -> tuple[Sampler, ...]:
    """The samplers a family (``models.NAME.backend``) runs."""
    return TABLES[FAMILIES[backend].sampling]


def schedules(backend: str) -> list[Schedule]:
    """The schedules any of its samplers takes, automatic first."""
    names = {s for sampler in samplers(backend) for s in sampler.schedules}
    return [s for name, s in SCHEDULES.items() if name == AUTOMATIC or name in names]


def _key(name: str) -> str:
    return name.strip().casefold()


def find_sampler(backend: str, name: str) -> Sampler | None:
    key = _key(name)
    return next((s for s in samplers(backend) if key in (_key(a) for a in (s.name, *s.aliases))), None)


def find_schedule(name: str) -> Schedule | None:
    key = _key(name)
    return next((s for s in SCHEDULES.values() if key in (_key(a) for a in (s.name, s.label, *s.aliases))), None)


def split_legacy(name: str) -> tuple[str, Schedule | None]:
    """A1111's older sampler names carry the schedule (``DPM++ 2M Karras``): (sampler,
    schedule) as A1111's ``get_sampler_and_scheduler`` splits them."""
    for schedule in SCHEDULES.values():
        for tail in (schedule.label, schedule.name, *schedule.aliases):
            if _key(name).endswith(" " + _key(tail)):
                return name.strip()[: -len(tail) - 1].strip(), schedule
    return name, None


@dataclass(frozen=True)
class Choice:
    """A job's sampler and schedule, as a model of the family runs them."""

    sampler: Sampler | None  # None: the model's own scheduler
    schedule: Schedule  # as asked (automatic: the sampler's default, else the model's)

    @property
    def effective(self) -> Schedule:
        """The schedule that runs (automatic resolved to the sampler's default)."""
        if self.schedule.name == AUTOMATIC and self.sampler is not None and self.sampler.default:
            return SCHEDULES[self.sampler.default]
        return self.schedule

    @property
    def flags(self) -> dict[str, Any]:
        """The scheduler's config overrides (``from_config(pipe.scheduler.config, **flags)``)."""
        return {**(self.sampler.flags if self.sampler else {}), **self.effective.flags}

    @property
    def stored(self) -> tuple[str | None, str | None]:
        """(sampler, schedule) as a job keeps them (``items.Item``): canonical names, the
        schedule that runs (None: the model's own)."""
        if self.sampler is None:
            return None, None
        schedule = self.effective.name
        return self.sampler.name, None if schedule == AUTOMATIC else schedule


def choose(backend: str, sampler: str | None, scheduler: str | None) -> Choice:
    """The sampler and schedule a request names, for a model of ``backend``; raises
    ``Unsupported`` naming the field and listing the names the family takes."""
    table = samplers(backend)
    names = ", ".join(s.name for s in table)
    schedule = SCHEDULES[AUTOMATIC]
    if scheduler:
        found = find_schedule(scheduler)
        if found is None or (found.name != AUTOMATIC and found not in schedules(backend)):
            valid = ", ".join(s.label for s in schedules(backend))
            raise Unsupported(f"scheduler {scheduler!r} is not one this model takes; use one of: {valid}", "scheduler", "unknown_scheduler")
        schedule = found
    if not sampler:
        if schedule.name != AUTOMATIC:
            raise Unsupported(f"scheduler {schedule.label!r} needs a sampler; add one of: {names or 'none'}", "sampler", "unknown_sampler")
        return Choice(None, schedule)
    found_sampler = find_sampler(backend, sampler)
    if found_sampler is None:
        base, tail = split_legacy(sampler)
        found_sampler = find_sampler(backend, base) if tail is not None else None
        schedule = tail or schedule
    if found_sampler is None:
        hint = f"use one of: {names}" if names else "this model runs only its own scheduler; drop sampler"
        raise Unsupported(f"sampler {sampler!r} is not one this model runs; {hint}", "sampler", "unknown_sampler")
    if schedule.name != AUTOMATIC and schedule.name not in found_sampler.schedules:
        valid = ", ".join(["Automatic", *(SCHEDULES[s].label for s in found_sampler.schedules)])
        raise Unsupported(f"sampler {found_sampler.name!r} does not take the schedule {schedule.label!r}; use one of: {valid}",
                          "scheduler", "unknown_scheduler")  # fmt: skip
    return Choice(found_sampler, schedule)




def timesteps(sampler: str | None, steps: int) -> int:
    """The timesteps (model evaluations, reported steps) a pipeline call of ``steps``
    steps runs with a stored (canonical) sampler name; 0 for none."""
    a, b = next((s.timesteps for table in TABLES.values() for s in table if s.name == sampler), (1, 0))
    return a * steps + b if steps > 0 else 0
