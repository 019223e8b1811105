"""Model residency: which models stay loaded in this process.

The policy, used by the model host (server/worker/host.py), which does the loading.

- ``residency.memory_budget_mib`` per device (``"cuda:0"``, ``"cpu"`` = host RAM):
  before a model loads, the least recently used *idle* models on its device are
  unloaded until it fits.  A model with waiting or running jobs is never evicted;
  when only busy models stand in the way the load waits (the model host retries each
  heartbeat, and when a job ends).  A model bigger than the whole budget is an error
  that names the budget and by how much it is over.
- A model's size is measured by the process that holds it (server/backends/memory.py):
  after each load its weights, and after each job what it really holds at its peak
  (on a CUDA device: the allocator's peak reserved memory and the process's CUDA
  context); the larger stays, so two models that fit by their weights but not once
  both have run a job are not both kept.  Before the first load,
  ``vram_estimate_mib`` stands in; a model of unknown size is taken to fit.
- Models in the server's own process (the upscaler; ``isolate: false``) share one
  allocator and one CUDA context: together they hold their weights plus the largest
  extra any of them measured beyond its weights (``held_mib``), and a peak measured
  in that process is the process's, so the other models' weights are taken off it
  (``record_peak``).  A model lent out (the upscaler during a generation's
  post-processing) is never evicted, and its peak after each use counts too.
- ``load_on_demand`` models load when a job for them waits; each load's seconds are
  kept (``ModelState.load_seconds``, the mean) and published with the worker's
  presence, so a forecast for a model that is not loaded adds its load time.
- ``idle_unload_seconds``: unloaded after that long with nothing waiting or running.

In Redis mode every worker host applies this to its own models and budget.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .backends.base import BackendError
from .backends.memory import model_device
from .families import FAMILIES, runs_isolated

if TYPE_CHECKING:
    from .broker.base import WorkerInfo
    from .config import ModelConfig, Settings
    from .registry import ModelState

log = logging.getLogger("easel.residency")


class TooBig(BackendError):
    """The model cannot fit in its device's budget even with every other model unloaded."""


class NoRoom(Exception):
    """The model fits only once busy models (waiting or running jobs) are idle: wait."""


def size_mib(ms: ModelState) -> float | None:
    """What ``ms`` takes once loaded: measured, else its configured estimate."""
    if ms.size_mib is not None:
        return ms.size_mib
    if FAMILIES[ms.cfg.backend].simulated and ms.cfg.simulate_size_mib is not None:
        return ms.cfg.simulate_size_mib
    return float(ms.cfg.vram_estimate_mib) if ms.cfg.vram_estimate_mib is not None else None


def weights_mib(ms: ModelState) -> float:
    """Its weights as measured at its last load (else its size, or 0 when unknown)."""
    return ms.weights_mib if ms.weights_mib is not None else (size_mib(ms) or 0.0)


def held_mib(models: list[ModelState]) -> float:
    """MiB that ``models`` (of one device) hold together: each model in its own process
    its size; the models in the server's process their weights plus the largest extra
    (activations, cached blocks, the CUDA context) one of them measured beyond them."""
    alone = sum(size_mib(m) or 0.0 for m in models if runs_isolated(m.cfg))
    shared = [m for m in models if not runs_isolated(m.cfg)]
    extra = max((max(0.0, (size_mib(m) or 0.0) - weights_mib(m)) for m in shared), default=0.0)
    return alone + sum(weights_mib(m) for m in shared) + extra


def record_peak(ms: ModelState, peak: float, models: list[ModelState]) -> bool:
    """After a job (or a lease) of ``ms``: its size raised to what it held at its
    ``peak``; True when that grew it.  A peak measured in the server's process covers
    the other loaded models there too, whose weights are taken off (the stub simulates
    its own)."""
    own = peak
    if not runs_isolated(ms.cfg) and not FAMILIES[ms.cfg.backend].simulated:
        device = model_device(ms.cfg)
        own -= sum(
            weights_mib(m) for m in models
            if m is not ms and m.state == "loaded" and not runs_isolated(m.cfg) and model_device(m.cfg) == device
        )  # fmt: skip
    if ms.size_mib is not None and own <= ms.size_mib:
        return False
    log.info("model %s: holds %.0f MiB at its peak (was counted as %s MiB)", ms.name, own, ms.size_mib)
    ms.size_mib = own
    return True


def shares_device(ms: ModelState, models: list[ModelState]) -> bool:
    """Another loaded model uses ``ms``'s CUDA device (only a CUDA allocator keeps blocks to give back)."""
    device = model_device(ms.cfg)
    return device.startswith("cuda") and any(m is not ms and m.state == "loaded" and model_device(m.cfg) == device for m in models)


class Residency:
    """The budgets of this process and when each model was last used."""

    def __init__(self, settings: Settings) -> None:
        self.budgets = dict(settings.residency.memory_budget_mib)
        self.last_used: dict[str, float] = {}  # time.monotonic() a job of the model last ran or ended

    def touch(self, model: str) -> None:
        self.last_used[model] = time.monotonic()

    def idle_for(self, model: str) -> float:
        return time.monotonic() - self.last_used.get(model, 0.0)

    def budget(self, device: str) -> int | None:
        return self.budgets.get(device)

    def _lru(self, models: list[ModelState]) -> list[ModelState]:
        return sorted(models, key=lambda m: self.last_used.get(m.name, 0.0))

    def plan(self, ms: ModelState, models: list[ModelState], busy: set[str]) -> list[str]:
        """The idle models to unload (least recently used first) so that ``ms`` fits;
        ``TooBig`` if it never can, ``NoRoom`` if busy models stand in the way."""
        device = model_device(ms.cfg)
        budget = self.budget(device)
        need = size_mib(ms)
        if budget is None or need is None:
            return []
        if need > budget:
            raise too_big(ms.name, need, device, budget, measured=ms.size_mib is not None)
        resident = [m for m in models if m is not ms and m.state in ("loaded", "loading") and model_device(m.cfg) == device]
        evict: list[str] = []
        for m in self._lru([m for m in resident if m.name not in busy and m.state == "loaded"]):
            if held_mib([*resident, ms]) <= budget:
                break
            evict.append(m.name)
            resident.remove(m)
        if held_mib([*resident, ms]) > budget:
            others = ", ".join(sorted(m.name for m in resident))
            raise NoRoom(
                f"model {ms.name!r} needs {need:.0f} MiB of residency.memory_budget_mib[{device!r}] = {budget} MiB; "
                f"{budget - held_mib(resident):.0f} MiB are free once idle models are unloaded, and {others} have jobs "
                "(or are in use): it loads when they are idle"
            )
        return evict

    def over(self, ms: ModelState, models: list[ModelState]) -> float:
        """MiB by which the loaded models on ``ms``'s device exceed its budget (<= 0: within)."""
        device = model_device(ms.cfg)
        budget = self.budget(device)
        if budget is None:
            return 0.0
        return held_mib([m for m in models if m.state == "loaded" and model_device(m.cfg) == device]) - budget

    def make_room(self, ms: ModelState, models: list[ModelState], busy: set[str]) -> list[str]:
        """After a job raised ``ms``'s size: the idle models on its device to unload
        (least recently used first) until its budget holds again, as far as idle ones allow."""
        device = model_device(ms.cfg)
        budget = self.budget(device)
        if budget is None:
            return []
        loaded = [m for m in models if m.state == "loaded" and model_device(m.cfg) == device]
        unload: list[str] = []
        for m in self._lru([m for m in loaded if m is not ms and m.name not in busy]):
            if held_mib(loaded) <= budget:
                break
            unload.append(m.name)
            loaded.remove(m)
        return unload


def too_big(name: str, need: float, device: str, budget: int, *, measured: bool) -> TooBig:
    how = "measured after loading" if measured else "estimated (vram_estimate_mib / simulate_size_mib)"
    return TooBig(
        f"model {name!r} needs {need:.0f} MiB ({how}) but residency.memory_budget_mib[{device!r}] is {budget} MiB: "
        f"{need - budget:.0f} MiB over; raise the budget, or make the model smaller (quantization, offload)"
    )


def on_demand_slots(cfg: ModelConfig | None, infos: list[WorkerInfo]) -> tuple[int, float] | None:
    """For a ``load_on_demand`` model that no worker has loaded: (slots once loaded,
    seconds to load it: the mean of the workers' learned load times, 0 before any
    load was measured); None when nobody would load it."""
    if cfg is None or not cfg.load_on_demand:
        return None
    able = [w for w in infos if w.state in ("unloaded", "loading")]
    if not able:
        return None
    known = [w.load_seconds for w in able if w.load_seconds is not None]
    return max(w.slots for w in able), (sum(known) / len(known) if known else 0.0)
