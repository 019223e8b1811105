"""What a submission costs the server (run by hand: ``python bench/bench_submit.py``).

In memory mode the event loop and a model's thread share one process, and so the
GIL: CPU the loop spends on submissions is CPU a pipeline that is Python-bound (the
tiny ones here; a GPU pipeline launching kernels) waits for. Against a stub server
(``role all``; a first job that sleeps holds the worker, so every edit queues):

1. **CPU per edit submit**: ``--edits`` edits like ``bench_forecast.py``'s
   FLUX.2-klein mix (64x64, 1-3 PNG references of 64-128 px as data URLs), sent one
   after the other; the server process's CPU time (user + system) over them, per
   submit, and the client's wall time per submit.
2. **The loop held up by large references**: ``--big`` edits with 4 references of
   ``--side`` x ``--side`` (a smooth PNG, as a photo compresses) while a thread
   of this bench calls ``/healthz`` over and over on its own connection; the median
   and the worst ``/healthz`` time while they go in, beside the same with no
   submissions (the loop's other requests wait for whatever a submit does on it).
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.bench_forecast import data_url  # noqa: E402
from tests.servers import start_server, stub_settings  # noqa: E402


def photo_url(side: int) -> str:
    """A data URL of a smooth side x side PNG (gradients and a little noise)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    noise = np.random.default_rng(0).integers(0, 20, (side, side, 3), dtype=np.uint8)
    arr = np.stack([x * 200 // side, y * 200 // side, (x + y) * 100 // side], -1).astype(np.uint8) + noise
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def healthz_times(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            c.get("/healthz").raise_for_status()
            out.append(time.perf_counter() - t0)


def while_submitting(url: str, submit: Callable[[], object]) -> list[float]:
    stop, out = threading.Event(), list[float]()
    t = threading.Thread(target=healthz_times, args=(url, stop, out))
    t.start()
    try:
        submit()
    finally:
        stop.set()
        t.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=300, help="small edits for the CPU per submit")
    p.add_argument("--big", type=int, default=5, help="edits with four large references")
    p.add_argument("--side", type=int, default=2048, help="the large references' width and height")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="easel-bench-") as d:
        srv = start_server(Path(d), stub_settings(simulate_step_seconds=1000.0, max_pixels=4096 * 4096))
        c = srv.client
        c.post("/api/generate", json={"prompt": "hold the worker", "width": 512, "height": 512, "steps": 50}).raise_for_status()
        rng = random.Random(0)
        urls = [data_url(rng.choice([64, 80, 96, 112, 128]), i) for i in range(10)]

        def edit(images: list[str]) -> None:
            r = c.post(
                "/api/edit", json={"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4, "images": images}
            )
            r.raise_for_status()

        small = [[rng.choice(urls) for _ in range(rng.randint(1, 3))] for _ in range(args.edits)]
        for images in small[:20]:  # warm-up
            edit(images)
        proc = psutil.Process(srv.proc.pid)
        before, t0 = proc.cpu_times(), time.perf_counter()
        for images in small:
            edit(images)
        after, wall = proc.cpu_times(), time.perf_counter() - t0
        cpu = (after.user + after.system - before.user - before.system) / len(small)
        refs = statistics.mean(len(s) for s in small)
        print(f"edit submit, {refs:.1f} references of 64-128 px on average: server CPU {1000 * cpu:.2f} ms each, "
              f"{1000 * wall / len(small):.2f} ms wall each")  # fmt: skip

        big = [photo_url(args.side)] * 4
        idle = while_submitting(srv.url, lambda: time.sleep(2.0))
        t0 = time.perf_counter()

        def big_edits() -> None:
            for _ in range(args.big):
                edit(big)

        busy = while_submitting(srv.url, big_edits)
        each = (time.perf_counter() - t0) / args.big
        mb = len(big[0]) * 4 / 1e6
        print(
            f"/healthz alone: median {1000 * statistics.median(idle):.2f} ms, worst {1000 * max(idle):.1f} ms ({len(idle)} calls)"
        )
        print(f"/healthz during {args.big} edits of 4 x {args.side}x{args.side} PNG ({mb:.1f} MB of data URLs each): "
              f"median {1000 * statistics.median(busy):.2f} ms, worst {1000 * max(busy):.1f} ms ({len(busy)} calls; "
              f"{each:.2f} s per edit)")  # fmt: skip
        srv.stop()


if __name__ == "__main__":
    main()
