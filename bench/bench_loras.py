"""Per-job cost of switching LoRA adapters (``models.NAME.lora_cache_size``).

A tiny random-weight pipeline (tests/tiny_pipelines.py) with two small random LoRA
adapters in its lora_dir runs jobs through the real backend: A,A,A,A... against
A,B,A,B..., with the adapter cache (default size 4) and without it (0: load and
delete per job, the old behaviour).  The goal: alternating costs within 10% of
repeating one adapter.

    python bench/bench_loras.py [--backend flux2_klein|sdxl] [--jobs 24]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="flux2_klein", choices=("flux2_klein", "sdxl"))
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from server.items import Lora
    from tests import tiny_pipelines as tp
    from tests.backend_helpers import RecordingContext, item, load_backend

    torch.set_num_threads(1)  # steadier figures on shared cores
    tmp = Path(tempfile.mkdtemp(prefix="easel-bench-loras-"))
    model_dir = getattr(tp, f"build_{args.backend}")(tmp / args.backend)
    lora_dir = tmp / "loras"
    tp.make_lora(args.backend, model_dir, lora_dir / "A", seed=1)
    tp.make_lora(args.backend, model_dir, lora_dir / "B", seed=2)
    print(f"{args.backend} tiny pipeline, 64x64, 2 steps, {args.jobs} jobs per pattern in interleaved blocks of 4, device {args.device}")
    print("| lora_cache_size | pattern | median s/job | mean s/job | vs A,A,A,A |")
    print("|---|---|---|---|---|")
    for cache_size in (4, 0):
        backend: Any = load_backend(args.backend, model_path=str(model_dir), lora_dir=str(lora_dir),
                                    lora_cache_size=cache_size, device=args.device)  # fmt: skip
        try:
            patterns = {"A,A,A,A": "AAAA", "A,B,A,B": "ABAB"}
            for name in "AB":  # warm-up: both adapters loaded once (the cache's steady state)
                backend.run(item(loras=[Lora(name, 1.0)]), RecordingContext())
            per_job: dict[str, list[float]] = {label: [] for label in patterns}
            for _ in range(max(1, args.jobs // 4)):  # blocks of the two patterns interleaved: shared cores drift alike
                for label, names in patterns.items():
                    start = time.perf_counter()
                    for name in names:
                        backend.run(item(loras=[Lora(name, 1.0)]), RecordingContext())
                    per_job[label].append((time.perf_counter() - start) / len(names))
            results = {label: (statistics.median(t), statistics.mean(t)) for label, t in per_job.items()}
            base = results["A,A,A,A"][0]
            for label, (median, mean) in results.items():
                print(f"| {cache_size} | {label} | {median:.4f} | {mean:.4f} | {median / base - 1:+.1%} |")
        finally:
            backend.unload()


if __name__ == "__main__":
    main()
