"""Model residency: which models stay loaded in this process.

The policy, used by the runner (server/runner.py); the registry does the loading.

- ``residency.memory_budget_mib`` per device (``"cuda:0"``, ``"cpu"`` = host RAM):
  before a model loads, the least recently used *idle* models on its device are
  unloaded until it fits.  A model with waiting or running jobs is never evicted;
  when only busy models stand in the way the load waits (the runner retries each
  heartbeat, and when a job ends).  A model bigger than the whole budget is an error
  that names the budget and by how much it is over.
- A model's size is measured after each load (``measure_mib``): on a CUDA device the
  growth of ``torch.cuda.memory_allocated`` over the load; on the CPU the bytes of
  the pipeline's parameters and buffers (the resident set of a process moves with
  malloc's caching and with other threads' work, so it is not an honest per-model
  figure); the stub's ``simulate_size_mib``.  Before the first load,
  ``vram_estimate_mib`` stands in; a model of unknown size is taken to fit.
- ``load_on_demand`` models load when a job for them waits; each load's seconds are
  kept (``ModelState.load_seconds``, the mean) and published with the worker's
  presence, so a forecast for a model that is not loaded adds its load time.
- ``idle_unload_seconds``: unloaded after that long with nothing waiting or running.

In Redis mode every worker host applies this to its own models and budget.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from .backends.base import BackendError

if TYPE_CHECKING:
    from .broker.base import WorkerInfo
    from .config import ModelConfig, Settings
    from .registry import ModelState

MIB = 2**20
log = logging.getLogger("easel.residency")


class TooBig(BackendError):
    """The model cannot fit in its device's budget even with every other model unloaded."""


class NoRoom(Exception):
    """The model fits only once busy models (waiting or running jobs) are idle: wait."""


def model_device(cfg: ModelConfig) -> str:
    """The budget key of a model: its device with an index (``cuda`` -> ``cuda:0``);
    ``auto`` is resolved as the Diffusers backends do (without importing torch when
    it is not loaded yet: then it is the CPU, or a stub)."""
    spec = cfg.device
    if cfg.backend == "stub":
        return "cpu" if spec == "auto" else spec
    torch: Any = _torch() if spec in ("auto", "cuda") else None
    cuda = torch is not None and torch.cuda.is_available()
    if spec == "auto":
        spec = "cuda" if cuda else "cpu"  # mps has no budget key of its own here
    if spec == "cuda":
        spec = "cuda:0"  # torch's current device until a process sets another (asking would start CUDA here)
    return spec


def _torch() -> Any:
    try:
        import torch
    except ImportError:  # pragma: no cover - the Diffusers backends need it anyway
        return None
    return torch


def cuda_allocated(device: str) -> int | None:
    """Bytes torch has allocated on a CUDA ``device`` now (None for any other device)."""
    torch = sys.modules.get("torch")
    if not device.startswith("cuda") or torch is None or not torch.cuda.is_available():
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


def module_bytes(obj: Any) -> int:
    """Bytes of the parameters and buffers of every torch module in a pipeline (its
    components), or of one module; shared tensors count once."""
    modules: list[Any] = []
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        modules = [m for m in components.values() if hasattr(m, "parameters") and hasattr(m, "buffers")]
    elif hasattr(obj, "parameters") and hasattr(obj, "buffers"):
        modules = [obj]
    seen: set[int] = set()
    return sum(tensor_bytes(t, seen) for module in modules for t in (*module.parameters(), *module.buffers()))


def tensor_bytes(t: Any, seen: set[int]) -> int:
    """Bytes of one tensor not counted yet (``seen``: storage addresses).  A wrapper
    tensor (a torchao float8 weight: no storage of its own, ``data_ptr()`` 0) counts
    the tensors it holds (``__tensor_flatten__``)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, name), seen) for name in names)
    ptr = t.data_ptr()
    if ptr in seen:
        return 0
    if ptr:
        seen.add(ptr)
    return int(t.numel() * t.element_size())


def load_and_measure(backend: Any, name: str, cfg: ModelConfig) -> float | None:
    """Load ``backend`` (in this process) and measure it: its size in MiB, None when it
    cannot be measured (measuring never fails a load)."""
    device = model_device(cfg)
    before = cuda_allocated(device)
    backend.load()
    try:
        return measure_mib(backend, cfg, device, before)
    except Exception as exc:
        log.warning("model %s: could not measure its size (%s)", name, exc)
        return None


def measure_mib(backend: Any, cfg: ModelConfig, device: str, cuda_before: int | None) -> float | None:
    """The measured size of a just-loaded ``backend`` in MiB (see the module doc)."""
    if cfg.backend == "stub":
        return cfg.simulate_size_mib
    if cuda_before is not None:
        after = cuda_allocated(device)
        if after is not None:
            return round(max(0, after - cuda_before) / MIB, 1)
    target = getattr(backend, "pipe", None) or getattr(backend, "_model", None)
    if target is None:
        return None
    size = module_bytes(target)
    return round(size / MIB, 1) if size else None


def size_mib(ms: ModelState) -> float | None:
    """What ``ms`` takes once loaded: measured, else its configured estimate."""
    if ms.size_mib is not None:
        return ms.size_mib
    if ms.cfg.backend == "stub" and ms.cfg.simulate_size_mib is not None:
        return ms.cfg.simulate_size_mib
    return float(ms.cfg.vram_estimate_mib) if ms.cfg.vram_estimate_mib is not None else None


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
        used = sum(size_mib(m) or 0.0 for m in resident)
        evict: list[str] = []
        for m in sorted((m for m in resident if m.name not in busy and m.state == "loaded"), key=lambda m: self.last_used.get(m.name, 0.0)):
            if used + need <= budget:
                break
            evict.append(m.name)
            used -= size_mib(m) or 0.0
        if used + need > budget:
            others = ", ".join(sorted(m.name for m in resident if m.name not in evict))
            raise NoRoom(
                f"model {ms.name!r} needs {need:.0f} MiB of residency.memory_budget_mib[{device!r}] = {budget} MiB; "
                f"{budget - used:.0f} MiB are free once idle models are unloaded, and {others} have jobs: "
                "it loads when they are idle"
            )
        return evict

    def over(self, ms: ModelState, models: list[ModelState]) -> float:
        """MiB by which the loaded models on ``ms``'s device exceed its budget (<= 0: within)."""
        device = model_device(ms.cfg)
        budget = self.budget(device)
        if budget is None:
            return 0.0
        used = sum(size_mib(m) or 0.0 for m in models if m.state == "loaded" and model_device(m.cfg) == device)
        return used - budget


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
