"""Configured models and their runtime state (``ModelState``: written only by the
worker's model host, server/worker/host.py; read by everyone), capabilities, and the
devices' memory report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .backends.base import Backend, Capabilities, model_capabilities
from .errors import NotFound

if TYPE_CHECKING:
    from .config import ModelConfig, Settings

State = Literal["unloaded", "loading", "loaded", "error"]


@dataclass(eq=False)
class ModelState:
    """A configured model and, on a worker, its loaded backend (written by the model host only)."""

    name: str
    cfg: ModelConfig
    state: State = "unloaded"
    backend: Backend | None = None
    load_error: str | None = None
    size_mib: float | None = None  # measured after its last load, raised to its peak after jobs (server/residency.py)
    weights_mib: float | None = None  # measured after its last load: its weights alone
    load_seconds: float | None = None  # mean seconds of its loads here
    loads: int = 0
    warm: bool = False  # has run a job since its last load (the first pays forecast's first_call)

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities if self.backend is not None else model_capabilities(self.cfg)


class Registry:
    """Every configured model, by name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ModelState] = {name: ModelState(name=name, cfg=cfg) for name, cfg in settings.models.items()}

    def get(self, name: str | None) -> ModelState:
        key = name or self.settings.default_model
        if key is None or key not in self.models:
            known = ", ".join(self.models) or "none"
            raise NotFound(f"unknown model {name!r}; configured models: {known}", param="model", code="model_not_found")
        return self.models[key]


def process_rss() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is in requirements
        return 0


def device_report() -> list[dict[str, Any]]:
    """Per-device memory: torch's view of CUDA devices where this process uses them (a
    model in its own process does not: asking would start CUDA here, a context of
    hundreds of MiB on every device), nvidia-smi when present, and the process RSS (the
    only meaningful figure on CPU)."""
    devices: list[dict[str, Any]] = [{"device": "cpu", "process_rss_mib": round(process_rss() / 2**20, 1)}]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append(
                {
                    "device": f"cuda:{i}",
                    "name": torch.cuda.get_device_name(i),
                    "total_mib": round(total / 2**20, 1),
                    "free_mib": round(free / 2**20, 1),
                    "allocated_mib": round(torch.cuda.memory_allocated(i) / 2**20, 1),
                    "reserved_mib": round(torch.cuda.memory_reserved(i) / 2**20, 1),
                    "max_allocated_mib": round(torch.cuda.max_memory_allocated(i) / 2**20, 1),
                }
            )
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,name,memory.used,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            for line in out.strip().splitlines():
                idx, gpu, used, total = (p.strip() for p in line.split(","))
                devices.append({"device": f"nvidia-smi:{idx}", "name": gpu, "used_mib": float(used), "total_mib": float(total)})
        except (subprocess.SubprocessError, ValueError, OSError) as exc:
            devices.append({"device": "nvidia-smi", "error": str(exc)})
    return devices
