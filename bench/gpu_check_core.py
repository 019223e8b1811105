"""What the GPU check's parts share (``bench/gpu_check.py``): its targets, environment,
rows and results, loading a model as the server does and timing one run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import torch

from server.backends.base import Task, WorkItem
from server.config import build_settings
from server.items import Item
from server.registry import ModelState
from server.worker.host import ModelHost
from tests.backend_helpers import NoopContext, reference
from tests.servers import RunningServer

BACKENDS = ("sdxl", "flux2_klein", "z_image", "qwen_edit_gguf")
EDIT_ONLY = {"qwen_edit_gguf"}
ONE_REFERENCE = {"sdxl", "z_image"}  # their edit is img2img from the first reference
SLOW_BF16_ON_CPU = {"qwen_edit_gguf"}  # its tiny 3-D VAE in bf16: ~16 s at 64 px on the 2-core VM
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROMPT = "a lighthouse at dusk"
MIB = 2**20
HUGE = {"width": 8192, "height": 8192, "n": 64, "steps": 1}  # the request schema's largest size and batch
OOM_CHECK = "huge job -> error, worker goes on"


class Skip(Exception):
    """The check does not apply here; the message says why."""


@dataclass
class Result:
    seconds: float | None = None
    peak_mib: float | None = None  # torch.cuda.max_memory_allocated over the call (CUDA only)
    value: str = ""
    detail: str = ""


@dataclass(kw_only=True)
class Row(Result):
    target: str
    check: str
    status: str  # ok | skipped | FAILED


@dataclass
class Target:
    """One backend on one model folder (tiny or real), and what its checks found."""

    label: str
    name: str  # its model name in the settings
    backend: str
    cfg: dict[str, Any]
    size: int
    steps: int
    sweep_size: tuple[int, int]
    ref_side: int
    ref_counts: list[int]
    found: dict[str, Any] = field(default_factory=dict)


@dataclass
class Env:
    device: str
    quick: bool
    threads: int
    tmp: Path
    server: RunningServer | None = None
    cap_mib: float | None = None  # the check server's CUDA allocator cap

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def served(self) -> str:
        """The dtype the server's ``torch_dtype: auto`` gives here (``diffusers_common.resolve_dtype``)."""
        return "bf16" if self.cuda else "fp32"

    def needs_cuda(self) -> None:
        if not self.cuda:
            why = f"--device {self.device}" if torch.cuda.is_available() else "torch.cuda.is_available() is False"
            raise Skip(f"needs CUDA ({why})")


# ----------------------------------------------------------------------------- loading and running


class Loaded:
    """At most one model loaded in this process at a time (so a peak holds only its
    weights), loaded as the server loads it (the worker's ``ModelHost.load``)."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.host: ModelHost | None = None
        self.ms: ModelState | None = None
        self.seconds = 0.0

    def get(self, target: Target, dtype: str, **overrides: Any) -> ModelState:
        overrides["torch_dtype"] = DTYPES[dtype]
        overrides.setdefault("isolate", False)  # these checks look into the pipeline and this process's torch.cuda
        key = (target.label, *sorted(overrides.items()))
        if key != self.key:
            self.release()
            self.key = key
            self.host = ModelHost.alone(build_settings({"models": {target.name: {**target.cfg, **overrides}}}))
            start = time.perf_counter()
            self.ms = anyio.run(self.host.load, target.name)
            self.seconds = time.perf_counter() - start
        assert self.ms is not None
        if self.ms.state != "loaded":
            raise RuntimeError(f"load failed: {self.ms.load_error}")
        return self.ms

    def release(self) -> None:
        if self.host is not None and self.ms is not None and self.ms.state == "loaded":
            anyio.run(self.host.unload, self.ms.name)
        self.key = self.host = self.ms = None


def work(target: Target, refs: int | None = None, size: tuple[int, int] | None = None) -> WorkItem:
    """The backend's main task (an edit with one reference for the edit-only model), or ``refs`` references."""
    k = (1 if target.backend in EDIT_ONLY else 0) if refs is None else refs
    w, h = size or (target.size, target.size)
    images = [reference(target.ref_side, target.ref_side, seed=i) for i in range(k)]
    strength = 1.0 if images and target.backend in ONE_REFERENCE else None  # img2img: every step denoises
    task: Task = "edit" if k else "generate"
    return WorkItem(task, Item(prompt=PROMPT, width=w, height=h, steps=target.steps, seed=1, strength=strength), images=images)


def respec(item: WorkItem, **changes: Any) -> WorkItem:
    """``item`` with its spec's ``changes`` (a new spec; the old item is left as it was)."""
    return dataclasses.replace(item, spec=msgspec.structs.replace(item.spec, **changes))


def timed_run(env: Env, ms: ModelState, item: WorkItem) -> tuple[float, float | None]:
    """Seconds and peak MiB (CUDA) of one ``backend.run``; the images must be as many as
    asked, of the asked size, and not uniform (NaN or overflow, e.g. in an fp16 VAE)."""
    assert ms.backend is not None
    if env.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = ms.backend.run(item, NoopContext())
    if env.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / MIB if env.cuda else None
    spec = item.spec
    if len(images) != spec.n or any(im.size != (spec.width, spec.height) for im in images):
        raise AssertionError(f"asked {spec.n} image(s) {spec.width}x{spec.height}, got {[im.size for im in images]}")
    if any(float(np.asarray(im.convert("RGB"), dtype=np.float32).std()) < 1.0 for im in images):
        raise AssertionError("a uniform image came back (NaN or overflow in the pipeline, e.g. an fp16 VAE)")
    return seconds, peak


def storage_bytes(t: torch.Tensor) -> int:
    """The bytes a tensor holds; a tensor subclass (torchao's Float8Tensor) by its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(storage_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Env, Target, Loaded], Result]  # raises Skip where the check does not apply
