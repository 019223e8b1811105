"""What live previews cost a job (run by hand: ``python bench/bench_previews.py``).

For tiny SDXL and tiny FLUX.2-klein (``tests/tiny_pipelines.py``, offline, CPU), served
through the API: the same job (24 steps by default) followed by ``/api/events`` with
``previews=true`` and without, runs alternated; medians of the worker's time for the
job (the image's ``seconds``: its pipeline call, encoding excluded) and of the client's
end-to-end time (submit -> ``end`` event), and the preview events received.  Goal:
previews followed cost <= 5% of the job.  On a shared, busy machine those medians
move by more than that from run to run, so the bench also times one preview in
process (the backend's projection of latents of the job's shape + the JPEG encode,
as the runner makes it) and reports previews x that cost / the job's time.
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests import tiny_pipelines as tp  # noqa: E402
from tests.servers import RunningServer, start_server  # noqa: E402

BUILDERS = {"sdxl": tp.build_sdxl, "flux2_klein": tp.build_flux2_klein}


def settings(backend: str, folder: Path) -> dict[str, Any]:
    model = {"backend": backend, "enabled": True, "model_path": str(folder), "max_pixels": 512 * 512,
             "default_width": 128, "default_height": 128}  # fmt: skip
    return {"models": {backend: model}, "default_model": backend}


def followed_job(c: httpx.Client, body: dict[str, Any], previews: bool) -> tuple[float, float, int]:
    """(worker seconds, end-to-end seconds, preview events) of one job followed by SSE."""
    t0 = time.perf_counter()
    tid = c.post("/api/generate", json=body).json()["task_id"]
    params = {"task_id": tid, **({"previews": "true"} if previews else {})}
    count, event = 0, None
    with c.stream("GET", "/api/events", params=params, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
                count += event == "preview"
                if event == "end":
                    break
    total = time.perf_counter() - t0
    st = c.get("/api/status", params={"task_id": tid}).json()
    assert st["status"] == "done", st
    c.get("/api/image", params={"task_id": tid, "delete": "true"})
    return float(st["images"][0]["seconds"]), total, count


def preview_cost(name: str, folder: Path, size: int, reps: int = 200) -> float:
    """Seconds for one preview: the backend's latent projection + JPEG encode."""
    import torch

    from server.worker.context import LIVE_PREVIEW_QUALITY
    from server.worker.encode import encode
    from tests.backend_helpers import item, load_backend

    backend: Any = load_backend(name, model_path=str(folder))
    try:
        work = item(width=size, height=size, steps=2)
        channels = backend._latent_channels(backend.pipe)
        if name == "flux2_klein":  # packed 2x2 tokens
            latents = torch.randn(1, (size // 16) ** 2, 4 * channels)
        else:
            latents = torch.randn(1, channels, size // 8, size // 8)
        project = backend._preview(work)
        t0 = time.perf_counter()
        for _ in range(reps):
            with torch.no_grad():
                encode(project(backend.pipe, latents), "JPEG", LIVE_PREVIEW_QUALITY)
        return (time.perf_counter() - t0) / reps
    finally:
        backend.unload()


def bench(srv: RunningServer, name: str, runs: int, size: int, steps: int, one_preview: float) -> None:
    body = {"prompt": "a lighthouse at dusk", "width": size, "height": size, "steps": steps, "seed": 0}
    c = srv.client
    for previews in (False, True):  # warm-up
        followed_job(c, body, previews)
    rows: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for k in range(runs):
        for previews in ((False, True) if k % 2 == 0 else (True, False)):
            rows[previews].append(followed_job(c, body, previews))
    med = {p: [statistics.median(col) for col in zip(*rows[p], strict=True)] for p in rows}
    off, on = med[False], med[True]
    print(f"  {name}: {size}x{size}, {steps} steps, median of {runs} alternated runs each")
    print(f"    worker time: previews off {1000 * off[0]:.1f} ms, on {1000 * on[0]:.1f} ms ({on[0] / off[0] - 1:+.1%}); "
          f"end to end: off {1000 * off[1]:.1f} ms, on {1000 * on[1]:.1f} ms ({on[1] / off[1] - 1:+.1%}); "
          f"preview events per job: {on[2]:.0f}")  # fmt: skip
    print(f"    one preview (projection + JPEG, in process): {1000 * one_preview:.2f} ms; "
          f"x {on[2]:.0f} per job = {on[2] * one_preview / off[0]:.2%} of the job")  # fmt: skip
    print("    " + json.dumps({"model": name, "worker_off_s": round(off[0], 4), "worker_on_s": round(on[0], 4),
                              "e2e_off_s": round(off[1], 4), "e2e_on_s": round(on[1], 4), "previews": on[2],
                              "one_preview_ms": round(1000 * one_preview, 3)}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--only", choices=sorted(BUILDERS))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="easel-bench-") as d:
        tmp = Path(d)
        for name, build in BUILDERS.items():
            if args.only not in (None, name):
                continue
            folder = build(tmp / name)
            one = preview_cost(name, folder, args.size)
            srv = start_server(tmp, settings(name, folder), env={"OMP_NUM_THREADS": str(args.threads)})
            try:
                bench(srv, name, args.runs, args.size, args.steps, one)
            finally:
                srv.stop()


if __name__ == "__main__":
    main()
