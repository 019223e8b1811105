"""Time and peak memory of the Diffusers backends, by resolution and by number of
reference images (in the spirit of seed 001's VRAM benchmark).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, else the process RSS
sampled every few milliseconds during the call (psutil).  Also reports memory at
rest after load and after unload.

    python bench/bench_backends.py                          # tiny random pipelines, all backends
    python bench/bench_backends.py --backend flux2_klein --model-path /models/FLUX.2-klein-4B \\
        --sizes 512x512,768x768,1024x1024 --refs 0,2,4,8 --size-for-refs 1024x768 --steps 4

Tiny mode builds the pipelines of ``tests/tiny_pipelines.py`` in a temp dir (offline);
its numbers measure the code path and overheads, not a real model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from server.backends.base import Task, WorkItem  # noqa: E402
from server.items import Item  # noqa: E402
from tests.backend_helpers import RecordingContext, load_backend, reference  # noqa: E402

EDIT_ONLY = {"qwen_edit_gguf"}
MIB = 1024 * 1024


class PeakMemory:
    """Peak memory (MiB) over a ``with`` block: CUDA allocator peak, or sampled RSS."""

    def __init__(self, interval: float = 0.005) -> None:
        self.cuda = torch.cuda.is_available()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return self.peak / MIB


def resting_mib() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / MIB
    return float(psutil.Process().memory_info().rss) / MIB


@dataclass
class Row:
    label: str
    seconds: float
    peak_mib: float


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def measure(backend: Any, work: WorkItem, repeats: int) -> tuple[float, float]:
    """Best wall time of ``repeats`` calls (after one warm-up) and the peak memory."""
    backend.run(work, RecordingContext())  # warm-up: lazy init, allocator growth
    best, peak = float("inf"), 0.0
    for _ in range(repeats):
        with PeakMemory() as mem:
            start = time.perf_counter()
            backend.run(work, RecordingContext())
            best = min(best, time.perf_counter() - start)
        peak = max(peak, mem.mib)
    return best, peak


def table(title: str, rows: list[Row]) -> str:
    unit = "peak VRAM (MiB)" if torch.cuda.is_available() else "peak RSS (MiB)"
    lines = [f"\n{title}", f"| case | time (s) | {unit} |", "|---|---|---|"]
    lines += [f"| {r.label} | {r.seconds:.3f} | {r.peak_mib:.0f} |" for r in rows]
    return "\n".join(lines)


def bench_backend(name: str, cfg: dict[str, Any], args: argparse.Namespace) -> None:
    before = resting_mib()
    start = time.perf_counter()
    backend = load_backend(name, device=args.device, torch_dtype=args.dtype, max_images=16, **cfg)
    load_s = time.perf_counter() - start
    loaded = resting_mib()
    print(f"\n## {name}  ({'cuda' if torch.cuda.is_available() else 'cpu'}, {args.steps} steps)")
    print(f"load {load_s:.2f} s; memory before load {before:.0f} MiB, after load {loaded:.0f} MiB")

    task: Task = "edit" if name in EDIT_ONLY else "generate"
    refs = [reference(256, 256, seed=k) for k in range(max(args.refs))]
    base_refs = refs[:1] if name in EDIT_ONLY else []
    rows = []
    for size in args.sizes:
        w, h = parse_size(size)
        work = WorkItem(task, Item(prompt="a lighthouse at dusk", width=w, height=h, steps=args.steps, seed=0), images=base_refs)
        rows.append(Row(f"{w}x{h}" + (" (1 ref)" if base_refs else ""), *measure(backend, work, args.repeats)))
    print(table(f"### {name}: by resolution", rows))

    if "edit" in backend.capabilities.tasks and name not in ("sdxl", "z_image"):
        w, h = parse_size(args.size_for_refs)
        rows = []
        for n in args.refs:
            if n == 0 and name in EDIT_ONLY:
                continue
            spec = Item(prompt="put them together", width=w, height=h, steps=args.steps, seed=0)
            work = WorkItem("edit" if n else "generate", spec, images=refs[:n])
            rows.append(Row(f"{n} refs @ {w}x{h}", *measure(backend, work, args.repeats)))
        print(table(f"### {name}: by number of reference images", rows))

    backend.unload()
    print(f"after unload {resting_mib():.0f} MiB (was {loaded:.0f} loaded, {before:.0f} before load)")


def bench_isolated(name: str, cfg: dict[str, Any], args: argparse.Namespace) -> None:
    """Memory of a model run in its own process (``ModelProcess``): what the child
    holds while loaded, and that unloading returns all of it."""
    from server.config import ModelConfig, Settings
    from server.worker.process import ModelProcess

    model = ModelConfig(backend=name, device=args.device, torch_dtype=args.dtype, **cfg)  # type: ignore[arg-type]
    backend = ModelProcess(f"bench-{name}", model, Settings())
    parent = psutil.Process().memory_info().rss / MIB
    start = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - start
    child = psutil.Process(backend.pid)
    task: Task = "edit" if name in EDIT_ONLY else "generate"
    w, h = parse_size(args.sizes[-1])
    spec = Item(prompt="a lighthouse", width=w, height=h, steps=args.steps, seed=0)
    work = WorkItem(task, spec, images=[reference()] if task == "edit" else [])
    start = time.perf_counter()
    backend.run(work, RecordingContext())
    run_s = time.perf_counter() - start
    child_mib = child.memory_info().rss / MIB
    pid = backend.pid
    backend.unload()
    gone = not psutil.pid_exists(pid) if pid else True
    print(
        f"\n## {name} isolated: start+load {load_s:.2f} s, one {w}x{h} call {run_s:.2f} s; child RSS {child_mib:.0f} MiB "
        f"(parent {parent:.0f} MiB); after unload the child process is {'gone' if gone else 'STILL ALIVE'}"
    )


def tiny_models(root: Path, backends: list[str]) -> dict[str, dict[str, Any]]:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen_plus

    from tests import tiny_pipelines as tp

    qwen_plus.VAE_IMAGE_SIZE = 128 * 128  # the real ~1 MP resize costs seconds per reference with the tiny VAE on CPU
    return {b: {"model_path": str(tp.BUILDERS[b](root / b))} for b in backends}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", action="append", choices=["flux2_klein", "sdxl", "z_image", "qwen_edit_gguf"])
    parser.add_argument("--model-path", help="a Diffusers folder (or repo id); default: tiny random pipelines")
    parser.add_argument("--base-model-path")
    parser.add_argument("--transformer-path", help="FP8 .safetensors or .gguf transformer file")
    parser.add_argument("--quantization", default="none", choices=["none", "fp8"])
    parser.add_argument("--offload", default="none", choices=["none", "model", "sequential"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--sizes", default="64x64,128x128,256x256", type=lambda s: s.split(","))
    parser.add_argument("--refs", default="0,1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--size-for-refs", default="128x128")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--isolated", action="store_true", help="also measure the model in a child process")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model_path or args.transformer_path:
        if not args.backend or len(args.backend) != 1:
            parser.error("--model-path/--transformer-path need exactly one --backend")
        cfg = {
            "model_path": args.model_path,
            "base_model_path": args.base_model_path,
            "transformer_path": args.transformer_path,
            "quantization": args.quantization,
            "offload": args.offload,
        }
        bench_backend(args.backend[0], cfg, args)
        if args.isolated:
            bench_isolated(args.backend[0], cfg, args)
        return
    backends = args.backend or ["flux2_klein", "sdxl", "z_image", "qwen_edit_gguf"]
    with tempfile.TemporaryDirectory(prefix="easel-bench-") as tmp:
        for name, cfg in tiny_models(Path(tmp), backends).items():
            bench_backend(name, cfg, args)
            if args.isolated:
                bench_isolated(name, cfg, args)


if __name__ == "__main__":
    main()
