"""What the prompt-embedding cache saves (run by hand: ``python bench/bench_prompt_cache.py``).

Tiny FLUX.2-klein (``tests/tiny_pipelines.py``, offline, CPU, one torch thread), loaded
as the server loads it and run as its worker runs it (``backend.run``): jobs with a
new prompt each and jobs repeating one prompt, alternated, ``--rounds`` of each;
medians of the job times and their ratio (repeated / new).  With ``--cache 0`` both
kinds run the text encoder (the ratio shows the noise floor).
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
from tests.backend_helpers import NoopContext, item, load_backend  # noqa: E402


def measure(rounds: int, size: int, steps: int, cache: int, model_dir: Path) -> dict[str, float]:
    backend = load_backend("flux2_klein", model_path=str(model_dir), prompt_cache_size=cache)
    ctx = NoopContext()
    backend.run(item(prompt="warm-up", width=size, height=size, steps=steps), ctx)
    backend.run(item(prompt="a lighthouse at dusk", width=size, height=size, steps=steps), ctx)
    new: list[float] = []
    repeated: list[float] = []
    for k in range(rounds):
        for prompt, times in ((f"a lighthouse at dusk, variation {k}", new), ("a lighthouse at dusk", repeated)):
            start = time.perf_counter()
            backend.run(item(prompt=prompt, width=size, height=size, steps=steps, seed=k), ctx)
            times.append(time.perf_counter() - start)
    backend.unload()
    new_s, repeated_s = statistics.median(new), statistics.median(repeated)
    return {"cache": cache, "new_ms": new_s * 1e3, "repeated_ms": repeated_s * 1e3, "ratio": repeated_s / new_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cache", type=int, nargs="+", default=[8, 0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = tp.build_flux2_klein(Path(tmp) / "klein")
        for cache in args.cache:
            r = measure(args.rounds, args.size, args.steps, cache, folder)
            print(json.dumps({k: round(v, 3) for k, v in r.items()}))


if __name__ == "__main__":
    main()
