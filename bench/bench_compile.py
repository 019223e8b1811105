"""What ``compile: "regional"`` costs and gives (run by hand: ``python bench/bench_compile.py``).

Tiny SDXL (``tests/tiny_pipelines.py``, offline, one torch thread) loaded as the server
loads it, with ``compile`` off and regional: the load time, the first job's time (the
compile happens there), and the steady step time (median gap between step callbacks
over ``--jobs`` later jobs of the same size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests import tiny_pipelines as tp  # noqa: E402
from tests.backend_helpers import item, load_backend  # noqa: E402


class StepTimes:
    """A StepContext that keeps the time of every step."""

    cancelled = False

    def __init__(self) -> None:
        self.at: list[float] = []

    def step(self, i: int, total: int, at: float | None = None) -> None:
        self.at.append(time.perf_counter())

    def wants_preview(self, i: int) -> bool:
        return False

    def preview(self, image: object, i: int | None = None) -> None:
        pass


def measure(backend_key: str, folder: Path, compile_mode: str, size: int, steps: int, jobs: int, device: str) -> dict[str, object]:
    start = time.perf_counter()
    backend = load_backend(backend_key, model_path=str(folder), compile=compile_mode, device=device)
    load_s = time.perf_counter() - start
    work = item(width=size, height=size, steps=steps)
    start = time.perf_counter()
    backend.run(work, StepTimes())
    first_s = time.perf_counter() - start
    gaps: list[float] = []
    job_s: list[float] = []
    for _ in range(jobs):
        ctx = StepTimes()
        start = time.perf_counter()
        backend.run(work, ctx)
        job_s.append(time.perf_counter() - start)
        gaps += [b - a for a, b in zip(ctx.at, ctx.at[1:], strict=False)]
    backend.unload()
    return {"backend": backend_key, "compile": compile_mode, "load_s": round(load_s, 3), "first_job_s": round(first_s, 3),
            "steady_job_ms": round(statistics.median(job_s) * 1e3, 2), "steady_step_ms": round(statistics.median(gaps) * 1e3, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="sdxl", choices=sorted(tp.BUILDERS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = tp.BUILDERS[args.backend](Path(tmp) / args.backend)
        for mode in ("off", "regional"):
            print(json.dumps(measure(args.backend, folder, mode, args.size, args.steps, args.jobs, args.device)), flush=True)


if __name__ == "__main__":
    main()
