"""Configured models and their runtime state: load, unload, capabilities, memory."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio

from . import hostmem, residency
from .backends import create_backend
from .backends.base import Backend, Capabilities, free_memory, model_capabilities
from .backends.isolated import IsolatedBackend
from .errors import Conflict, NotFound
from .training import TRAINABLE_BACKENDS

if TYPE_CHECKING:
    from .config import ModelConfig, Settings

log = logging.getLogger("easel")
State = Literal["unloaded", "loading", "loaded", "error"]


@dataclass(eq=False)
class ModelState:
    """A configured model and, on a worker, its loaded backend."""

    name: str
    cfg: ModelConfig
    state: State = "unloaded"
    backend: Backend | None = None
    load_error: str | None = None
    limiter: anyio.CapacityLimiter | None = None  # the model's GPU threads: target_inflight at once
    size_mib: float | None = None  # measured after its last load (server/residency.py)
    load_seconds: float | None = None  # mean seconds of its loads here
    loads: int = 0
    warm: bool = False  # has run a job since its last load (the first pays forecast's first_call)

    @property
    def capabilities(self) -> Capabilities:
        if self.backend is not None:
            caps = self.backend.capabilities
        else:
            default = ("edit",) if self.cfg.backend == "qwen_edit_gguf" else ("generate", "edit")
            caps = model_capabilities(self.cfg, default)
        if self.cfg.backend in TRAINABLE_BACKENDS and self.cfg.lora_dir and "train" not in caps.tasks:
            caps = dataclasses.replace(caps, tasks=(*caps.tasks, "train"), supports_training=True)
        return caps


class Registry:
    """Every configured model; on a worker, loads and unloads their backends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ModelState] = {name: ModelState(name=name, cfg=cfg) for name, cfg in settings.models.items()}

    def get(self, name: str | None) -> ModelState:
        key = name or self.settings.default_model
        if key is None or key not in self.models:
            known = ", ".join(self.models) or "none"
            raise NotFound(f"unknown model {name!r}; configured models: {known}", param="model", code="model_not_found")
        return self.models[key]

    async def load(self, name: str) -> ModelState:
        """Load a model off the event loop; its state reads 'loading' meanwhile (the
        runner guards against loading one twice)."""
        ms = self.get(name)
        if ms.state == "loaded":
            return ms
        ms.state = "loading"
        ms.load_error = None
        log.info("model %s: loading (backend %s)", name, ms.cfg.backend)
        start = time.monotonic()
        try:
            backend, size = await anyio.to_thread.run_sync(self._create_and_load, name, ms.cfg)
        except Exception as exc:  # a load failure is state, not a crash
            ms.state = "error"
            ms.load_error = _load_message(exc)
            log.warning("model %s: load failed: %s", name, ms.load_error)
            return ms
        took = time.monotonic() - start
        ms.load_seconds = took if ms.load_seconds is None else (ms.load_seconds * ms.loads + took) / (ms.loads + 1)
        ms.loads += 1
        ms.size_mib = size if size is not None else ms.size_mib
        ms.backend = backend
        ms.limiter = anyio.CapacityLimiter(ms.cfg.target_inflight)
        ms.warm = False
        ms.state = "loaded"
        log.info("model %s: loaded in %.2fs (%s MiB)", name, took, size if size is not None else "size unknown")
        return ms

    def _create_and_load(self, name: str, cfg: ModelConfig) -> tuple[Backend, float | None]:
        """The loaded backend and its measured size in MiB (server/residency.py); a
        model in its own process measures itself (this process never touches its device)."""
        backend = create_backend(name, cfg, self.settings)
        if isinstance(backend, IsolatedBackend):
            backend.load()
            return backend, backend.size_mib
        return backend, residency.load_and_measure(backend, name, cfg)

    async def unload(self, name: str) -> ModelState:
        ms = self.get(name)
        if ms.state == "loading":
            raise Conflict(f"model {name!r} is still loading; unload it once it has loaded", param="model")
        backend, ms.backend = ms.backend, None
        ms.state = "unloaded"
        ms.limiter = None
        if backend is not None:
            await anyio.to_thread.run_sync(_release, backend)
        log.info("model %s: unloaded", name)
        return ms


def _release(backend: Backend) -> None:
    backend.unload()
    del backend
    free_memory()
    hostmem.trim()  # the freed weights' pages, kept by the malloc settings, go back too


def _load_message(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, OSError)) and "model_index.json" in text:
        return f"model folder is not a Diffusers pipeline (no model_index.json): {text}"
    return text if len(text) < 600 else text[:600] + "..."


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
