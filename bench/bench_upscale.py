"""Upscale timing with a tiny random RRDBNet (16 filters, 2 blocks, x4) on CPU.

    python bench/bench_upscale.py [--repeat 5] [--threads N] [--device cpu]

Prints the best and median wall time per call for 64->256 and 256->1024 (x4), both untiled
and with the default 512-px tiles (equal here: both inputs fit in one tile) and
with 128-px tiles to show the tiling overhead.  The tiny model has ~1/40 of the
full RealESRGAN_x4plus compute, so these numbers are about the server's
plumbing, not about real-model speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.backends.upscale import UpscaleBackend  # noqa: E402
from server.config import ModelConfig, Settings  # noqa: E402
from tests.tiny_upscaler import write_tiny_esrgan  # noqa: E402


def timed(backend: UpscaleBackend, image: Image.Image, repeat: int) -> tuple[float, float]:
    """(best, median) seconds per call."""
    backend.upscale(image, 4)  # warm-up (allocator, oneDNN kernels)
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        backend.upscale(image, 4)
        runs.append(time.perf_counter() - start)
    return min(runs), statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_esrgan(Path(tmp) / "tiny_x4.pth")
        print(
            f"torch {torch.__version__}, device {args.device}, {args.threads} threads, checkpoint {path.stat().st_size / 1e6:.1f} MB"
        )
        for tile in (0, 512, 128):
            backend = UpscaleBackend(
                "bench",
                ModelConfig(
                    backend="upscale_esrgan", model_path=str(path), device=args.device, tile_size=tile, max_pixels=1 << 24
                ),
                Settings(),
            )
            backend.load()
            for side in (64, 256):
                image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
                best, median = timed(backend, image, args.repeat)
                print(f"tile {tile or 'off':>4}  {side}->{side * 4}: best {best * 1000:7.1f} ms, median {median * 1000:7.1f} ms")
            backend.unload()


if __name__ == "__main__":
    main()
