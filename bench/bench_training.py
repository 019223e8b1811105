"""LoRA training benchmark on the tiny pipelines (run by hand:
``python bench/bench_training.py``).

For tiny FLUX.2-klein and Z-Image pipelines (tests/tiny_pipelines.py) and a
synthetic dataset of colored shapes with captions, runs the real training runner
(the one train jobs use) for ``--steps`` steps and prints:

- seconds per training step (after the one-off latent/caption cache),
- the cache time,
- the mean loss of the first and last 10 steps, and whether it fell.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.backends import create_backend  # noqa: E402
from server.config import build_settings  # noqa: E402
from server.training.dataset import validate_dataset  # noqa: E402
from server.training.lora_trainer import LoraTrainer  # noqa: E402
from server.training.plan import TrainPlan  # noqa: E402
from tests.datasets import write_dataset  # noqa: E402
from tests.tiny_pipelines import build_flux2_klein, build_z_image  # noqa: E402

BUILDERS = {"flux2_klein": build_flux2_klein, "z_image": build_z_image}


class RecordingContext:
    """The runner's view of a job (``JobContext``), recording steps and losses."""

    def __init__(self) -> None:
        self.job = type("BenchJob", (), {"id": "bench"})()
        self.cancelled = False
        self.step_times: list[float] = []
        self.losses: list[float] = []

    def step(self, i: int, total: int) -> None:
        self.step_times.append(time.perf_counter())

    def set_extra(self, **values: Any) -> None:
        if "loss" in values:
            self.losses.append(values["loss"])


def bench(backend: str, tmp: Path, dataset: Path, args: argparse.Namespace) -> dict[str, Any]:
    model_dir = BUILDERS[backend](tmp / backend)
    settings = build_settings(
        {"models": {"m": {"backend": backend, "model_path": str(model_dir), "lora_dir": str(tmp / "loras"), "device": "cpu"}}}
    )
    model = create_backend("m", settings.models["m"], settings)  # the trainer in this process
    model.load()
    folder, samples = validate_dataset(str(dataset), [str(dataset.parent)])
    plan = TrainPlan(
        model="m", backend=backend, base_model=str(model_dir), dataset=folder, samples=samples,
        adapter_name=f"bench-{backend}", output=tmp / "loras" / f"bench-{backend}", steps=args.steps, rank=args.rank,
        alpha=float(args.rank), learning_rate=args.lr, batch_size=args.batch, resolution=args.resolution, seed=0,
        save_every=None, gradient_checkpointing=False,
    )  # fmt: skip
    ctx = RecordingContext()
    start = time.perf_counter()
    LoraTrainer(plan)(model, ctx.job, ctx)  # type: ignore[arg-type]
    total = time.perf_counter() - start
    steps = ctx.step_times
    per_step = (steps[-1] - steps[0]) / (len(steps) - 1)
    first, last = statistics.mean(ctx.losses[:10]), statistics.mean(ctx.losses[-10:])
    return {
        "backend": backend,
        "cache_s": round(steps[0] - start - per_step, 2),
        "s_per_step": round(per_step, 4),
        "total_s": round(total, 2),
        "loss_first10": round(first, 4),
        "loss_last10": round(last, 4),
        "loss_fell": last < first,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--backends", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dataset = write_dataset(tmp / "datasets" / "shapes")
        print(f"{args.steps} steps, batch {args.batch}, {args.resolution}px, rank {args.rank}, lr {args.lr}, 4 images")
        for backend in args.backends:
            print(bench(backend, tmp, dataset, args))


if __name__ == "__main__":
    main()
