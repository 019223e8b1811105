"""A real Diffusers backend through the API (run by hand: ``python bench/bench_backends_api.py``).

1. End-to-end API time of a tiny-SDXL job (submit, long-poll until done, fetch the
   PNG; ``--mode redis``: through an API node, the job run by a worker node) against a direct call of the same pipeline folder with the same parameters
   in this process (``StableDiffusionXLPipeline.from_pretrained``), same torch
   threads, runs alternated, medians compared. The server keeps freed memory for the
   next job (``host_memory.retain_mib``, server/hostmem.py) and this process, like a
   plain script, does not; ``--tune-direct`` gives the direct call the same malloc
   settings, which leaves the HTTP and queue overhead alone in the ratio.  It also
   divides each job's end-to-end time by that job's own pipeline call as the server
   timed it (its image's ``seconds``): what the server adds, free of the noise between
   two processes' calls (on this VM two identical model processes run the same calls
   up to 4% apart, and the host's speed drifts between runs).
2. Forecast error (MAPE of ``expected_time_seconds`` against the real completion
   time) on a queue of 16 mixed tiny-SDXL jobs after a dozen warm-up jobs.

The pipeline is the tiny random-weight SDXL of ``tests/tiny_pipelines.py`` (offline).
"""

from __future__ import annotations

import argparse
import os
import random
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
import torch  # noqa: E402

from bench.bench_core import forecast_error  # noqa: E402
from bench.nodes import cluster, lay_out  # noqa: E402
from server import hostmem  # noqa: E402
from server.config import Settings  # noqa: E402
from server.worker.encode import encode  # noqa: E402
from tests import tiny_pipelines as tp  # noqa: E402
from tests.servers import RunningServer, start_server  # noqa: E402

PROMPT = "a lighthouse at dusk"
GUIDANCE = 5.0  # the SDXL backend's default


def sdxl_settings(folder: Path) -> dict[str, Any]:
    model = {"backend": "sdxl", "enabled": True, "model_path": str(folder), "max_pixels": 256 * 256,
             "default_width": 128, "default_height": 128, "max_output_images": 2}  # fmt: skip
    return {"models": {"sdxl": model}, "default_model": "sdxl"}


def api_job(c: httpx.Client, body: dict[str, Any]) -> str:
    """submit -> long-poll (answers on each status change, no polling delay) -> fetch;
    the job's id."""
    tid = str(c.post("/api/generate", json=body).json()["task_id"])
    r = c.get("/api/image", params={"task_id": tid, "delete": "true", "wait": 60})  # waits for the job, then the bytes
    r.raise_for_status()
    return tid


def phases(c: httpx.Client, tid: str, sent: float, fetched: float) -> dict[str, float]:
    """Where one job's end-to-end time went, in seconds: ``sent`` / ``fetched`` are the
    wall-clock times (``time.time``) of the submit and of the image's last byte; the
    record's times are on the broker's clock (this host's, or redis-server's on it)."""
    st = c.get("/api/status", params={"task_id": tid}).json()
    call = float(st["images"][0]["seconds"])  # the pipeline call, as the server timed it
    created, started, finished = (float(st[k]) for k in ("created_at", "started_at", "finished_at"))
    return {
        "submit (to the record)": created - sent,
        "queue (to the claim)": started - created,
        "pipeline call": call,
        "encode + store": finished - (started + call),
        "answer (to the last byte)": fetched - finished,
        "end to end": fetched - sent,
    }


def direct_call(pipe: Any, size: int, steps: int, seed: int) -> Any:
    out = pipe(
        prompt=PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
        generator=[torch.Generator("cpu").manual_seed(seed)], num_images_per_prompt=1, output_type="pil",
    )  # fmt: skip
    return out.images[0]


def bench_overhead(srv: RunningServer, folder: Path, runs: int, size: int, steps: int, cores: tuple[set[int], set[int]] | None) -> None:
    """``cores``: (the model's core, the others) with ``--pin``: the direct calls on the
    model's core, the bench's HTTP calls on the others."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    body = {"prompt": PROMPT, "width": size, "height": size, "steps": steps, "seed": 0, "format": "PNG"}
    c = srv.client
    for _ in range(2):  # warm-up both
        api_job(c, body)
        direct_call(pipe, size, steps, 0)
    api, direct, encoded, jobs = [], [], [], []
    for _ in range(runs):
        if cores is not None:
            os.sched_setaffinity(0, cores[1])
        sent, t0 = time.time(), time.perf_counter()
        tid = api_job(c, body)
        api.append(time.perf_counter() - t0)
        jobs.append(phases(c, tid, sent, time.time()))  # after the clock
        if cores is not None:
            os.sched_setaffinity(0, cores[0])
        t0 = time.perf_counter()
        image = direct_call(pipe, size, steps, 0)
        direct.append(time.perf_counter() - t0)
        encode(image, "PNG", 85)
        encoded.append(time.perf_counter() - t0)
    m_api, m_direct, m_enc = (statistics.median(x) for x in (api, direct, encoded))
    print(f"  {size}x{size}, {steps} steps, PNG, median of {runs} alternated runs:")
    print(f"  API end to end {1000 * m_api:.1f} ms; direct call {1000 * m_direct:.1f} ms (+ PNG encode {1000 * m_enc:.1f} ms)")
    print(f"  ratio API / direct: {m_api / m_direct:.3f}x (target <= 1.05x); API / (direct + encode): {m_api / m_enc:.3f}x")
    own = [j["end to end"] / j["pipeline call"] for j in jobs]
    q = statistics.quantiles(own, n=4)
    print(f"  API end to end / the same job's pipeline call in the server: {statistics.median(own):.3f}x (quartiles {q[0]:.3f}-{q[2]:.3f}): "
          "what the server adds to a job, without the noise between a direct call and the server's")  # fmt: skip
    print("  where a job's time goes (median ms): " + ", ".join(f"{k} {1000 * statistics.median(j[k] for j in jobs):.1f}" for k in jobs[0]))


def bench_forecast(srv: RunningServer, seed: int) -> None:
    rng = random.Random(seed)
    sizes = [64, 80, 96, 112, 128]

    def mixed() -> dict[str, object]:
        return {"prompt": PROMPT, "width": rng.choice(sizes), "height": rng.choice(sizes),
                "steps": rng.randint(2, 6), "n": rng.randint(1, 2)}  # fmt: skip

    forecast_error(srv.client, mixed, "sdxl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["overhead", "forecast"])
    p.add_argument("--tune-direct", action="store_true", help="the server's malloc settings for the direct call too")
    p.add_argument("--mode", choices=["memory", "redis"], default="memory",
                   help="the overhead through one server (memory) or an API node, a worker node and redis-server")
    p.add_argument("--pin", action="store_true", help="the server's model process and the direct calls on core 0, the rest on the others")
    args = p.parse_args()
    all_cores = sorted(os.sched_getaffinity(0))
    if args.pin and len(all_cores) < 2:
        p.error("--pin needs two cores or more")
    cores = ({all_cores[0]}, set(all_cores[1:])) if args.pin else None
    torch.set_num_threads(args.threads)
    if args.tune_direct and not hostmem.tune(Settings().host_memory.retain_mib):
        p.error("--tune-direct needs glibc")
    with tempfile.TemporaryDirectory(prefix="easel-bench-") as d:
        tmp = Path(d)
        folder = tp.build_sdxl(tmp / "sdxl")
        env = {"OMP_NUM_THREADS": str(args.threads)}
        if args.only in (None, "overhead"):
            tuned = "the server's malloc settings" if args.tune_direct else "glibc's default malloc settings"
            print(f"1. tiny SDXL: API vs direct pipeline call ({args.threads} torch thread(s); direct call with {tuned}; "
                  f"mode {args.mode}{', pinned' if args.pin else ''})")  # fmt: skip
            with cluster(tmp, args.mode, sdxl_settings(folder), env) as (srv, pids):
                if cores is not None:
                    api_job(srv.client, {"prompt": PROMPT, "width": 64, "height": 64, "steps": 1})  # the model's process is up
                    lay_out(pids, *cores)
                bench_overhead(srv, folder, args.runs, args.size, args.steps, cores)
        if args.only in (None, "forecast"):
            print("2. forecast error on 16 mixed tiny-SDXL jobs (64-128 px, 2-6 steps, n 1-2)")
            srv = start_server(tmp, sdxl_settings(folder), env=env)
            try:
                bench_forecast(srv, args.seed)
            finally:
                srv.stop()


if __name__ == "__main__":
    main()
