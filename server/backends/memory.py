"""What a loaded model holds in memory, measured by the process that holds it.

- After a load (``load_and_measure``): on a CUDA device the growth of
  ``torch.cuda.memory_allocated`` over the load; on the CPU the bytes of the
  pipeline's parameters and buffers (the resident set of a process moves with
  malloc's caching and with other threads' work, so it is not an honest per-model
  figure); the stub's ``simulate_size_mib``.
- After a job (``peak_mib``): on a CUDA device what the process really keeps there —
  the allocator's peak reserved memory (weights, the job's activations, the blocks
  it caches) plus the process's CUDA context; the stub's ``simulate_size_mib +
  simulate_peak_mib``.  On the CPU a job's peak is transient host memory, not counted.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from ..families import FAMILIES

if TYPE_CHECKING:
    from ..config import ModelConfig

MIB = 2**20
CUDA_CONTEXT_MIB = 500.0  # a CUDA context when the driver cannot be asked (NVML): typical of recent GPUs
log = logging.getLogger("easel.residency")


def model_device(cfg: ModelConfig) -> str:
    """The budget key of a model: its device with an index (``cuda`` -> ``cuda:0``);
    ``auto`` is resolved as the Diffusers backends do (without importing torch when
    it is not loaded yet: then it is the CPU, or a stub)."""
    spec = cfg.device
    if FAMILIES[cfg.backend].simulated:
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
    elif hasattr(getattr(obj, "model", None), "parameters"):  # a spandrel descriptor (the upscaler) holds its module
        modules = [obj.model]
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
    if FAMILIES[cfg.backend].simulated:
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


def peak_mib(device: str) -> float | None:
    """What this process holds on a CUDA ``device`` at its peak, in MiB: the caching
    allocator's peak reserved memory plus the process's CUDA context (None elsewhere).
    The peak counter is reset, so the next job's peak is its own."""
    torch = sys.modules.get("torch")
    if not device.startswith("cuda") or torch is None or not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak / MIB + context_mib(device), 1)


def context_mib(device: str) -> float:
    """This process's CUDA context on ``device``: what the driver says the process uses
    beyond torch's reserved memory (NVML, via ``torch.cuda.list_gpu_processes``'s
    source), else ``CUDA_CONTEXT_MIB``."""
    try:
        import os

        import pynvml  # nvidia-ml-py (requirements-gpu.txt)
        import torch

        pynvml.nvmlInit()
        index = torch.device(device).index or 0
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return max(0.0, proc.usedGpuMemory / MIB - torch.cuda.memory_reserved(device) / MIB)
    except Exception:  # no NVML here (or it cannot see this process: containers): the typical figure
        pass
    return CUDA_CONTEXT_MIB


def release_cache(device: str) -> None:
    """Give the CUDA caching allocator's blocks back to ``device`` (another model shares
    it).  Nothing else: a full garbage collection here would cost a large pipeline's
    process hundreds of milliseconds between every two jobs."""
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
