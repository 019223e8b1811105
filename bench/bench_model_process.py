"""The same backend in this process and in its own process (``ModelProcess``), no server.

    python bench/bench_model_process.py [--rounds 3] [--jobs 40] [--size 128] [--steps 4] [--pin]

Builds tiny SDXL (``tests/tiny_pipelines.py``), loads it twice (in this process, and in
a ``ModelProcess`` as the worker does by default) and times ``--jobs`` back-to-back calls
on each, alternating per round.  It separates what a model in its own process costs
(the pipe, pickling, another interpreter) from what the server adds (bench_drain.py's
gaps).  ``--pin``: the model's process onto the bench's core as well.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.bench_backends_api import PROMPT, sdxl_settings  # noqa: E402
from server import hostmem  # noqa: E402
from server.backends import create_backend  # noqa: E402
from server.backends.base import WorkItem  # noqa: E402
from server.config import build_settings  # noqa: E402
from server.items import Item  # noqa: E402
from server.worker.process import ModelProcess  # noqa: E402
from tests import tiny_pipelines as tp  # noqa: E402
from tests.backend_helpers import NoopContext  # noqa: E402


def drain(backend: Any, n: int, size: int, steps: int) -> float:
    ctx = NoopContext()
    t0 = time.perf_counter()
    for i in range(n):
        backend.run(WorkItem("generate", Item(prompt=PROMPT, width=size, height=size, steps=steps, seed=i)), ctx)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=40)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--pin", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="easel-proc-") as d:
        settings = build_settings(sdxl_settings(tp.build_sdxl(Path(d) / "sdxl")))
        hostmem.tune(settings.host_memory.retain_mib)
        here = create_backend("sdxl", settings.models["sdxl"], settings)
        here.load()
        child = ModelProcess("sdxl", settings.models["sdxl"], settings)
        child.load()
        core = {min(os.sched_getaffinity(0))}
        os.sched_setaffinity(0, core)
        if args.pin and child.pid is not None:
            for tid in os.listdir(f"/proc/{child.pid}/task"):
                os.sched_setaffinity(int(tid), core)
        drain(here, 4, args.size, args.steps)
        drain(child, 4, args.size, args.steps)
        ratios = []
        for r in range(args.rounds):
            order = (here, child) if r % 2 == 0 else (child, here)
            times = {id(b): drain(b, args.jobs, args.size, args.steps) for b in order}
            ratios.append(times[id(child)] / times[id(here)])
            print(f"round {r + 1}: in this process {times[id(here)]:.3f} s, in its own process {times[id(child)]:.3f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
        print(f"median ratio {statistics.median(ratios):.3f} (spread {min(ratios):.3f}-{max(ratios):.3f})")
        child.unload()


if __name__ == "__main__":
    main()
