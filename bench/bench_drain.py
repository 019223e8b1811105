"""Saturated drain (run by hand: ``python bench/bench_drain.py --mode memory|redis``).

N tiny-SDXL jobs (default 40; 128x128, 4 steps, PNG) are submitted at once; the
server's drain time is the last job's ``finished_at`` minus the first job's
``started_at`` (from ``/api/status``: both on the broker's clock).  It is compared
with N back-to-back calls of the same backend in this process: the backend is built
by ``server.backends.create_backend`` from the same settings, loaded, and called
with ``backend.run(WorkItem(...), ctx)`` and a no-op ``StepContext``, which is the
call the server's worker makes on the model's thread (``server.worker.execute.execute``);
this process also gets the server's malloc settings (``server.hostmem.tune``, as
``server.cli.main`` does at start-up) and the same torch thread count
(``torch.set_num_threads`` here, ``OMP_NUM_THREADS`` for the server).  Rounds
alternate direct and server drains (the order flips each round); medians and their
ratio are printed (target <= 1.05: the model must never wait for the server).

Per job, the gap before job k+1 is its ``started_at`` minus the end of job k's
pipeline call (job k's ``started_at`` + its image's ``seconds``): the time the model
sat idle between two queued jobs.

Modes: ``memory`` (one ``server.py`` process, role all) and ``redis`` (a
redis-server in a temp dir, one ``--role api`` node taking the submissions and
status calls, one ``--role worker`` node running the model).

``--pin`` (Linux, 2+ cores) lays the processes out as separate hosts would: the
measured pipeline gets core 0 alone in both runs (the bench's direct calls, and the
server's model process, pinned there: core 0 plays the GPU), while the worker's event
loop and encoding, the API node, redis-server and the bench's submitting and polling
share the other cores (the host's CPU). Without it, every process competes for every
core and the rounds vary by +-5% between themselves.

``--fresh``: each round on a fresh server and a fresh model process for the direct
calls (``server.worker.process.ModelProcess``, loaded and called as the server's worker
does, without a server); within the round the two alternate ``--inner`` times, and the
round's ratio is its summed drains over its summed direct calls.  On this VM the host's
speed drifts by +-25% over tens of seconds, and one process runs the same calls 5-10%
faster or slower than another for its whole life: a bench that keeps its
processes measures their luck, and one that starts new ones between two drains
measures the drift.  Fresh processes each round, alternated within it, cancel the
drift inside a round and sample the processes' luck across rounds.

``--in-process``: the model runs on a thread of the server's process, which then may
use every core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from bench.bench_backends_api import PROMPT, sdxl_settings  # noqa: E402
from bench.nodes import cluster, lay_out, pin  # noqa: E402
from server import hostmem  # noqa: E402
from server.backends import create_backend  # noqa: E402
from server.backends.base import WorkItem  # noqa: E402
from server.config import build_settings  # noqa: E402
from server.items import Item  # noqa: E402
from server.worker.encode import encode  # noqa: E402
from server.worker.process import ModelProcess  # noqa: E402
from tests import tiny_pipelines as tp  # noqa: E402
from tests.backend_helpers import NoopContext  # noqa: E402
from tests.servers import RunningServer  # noqa: E402


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in {**pids, "bench": os.getpid()}.items():
        t = psutil.Process(pid).cpu_times()
        out[name] = t.user + t.system + (t.children_user + t.children_system if name != "bench" else 0.0)
    return out


def server_drain(c: httpx.Client, n: int, size: int, steps: int, timeout: float, pids: dict[str, int]) -> dict[str, Any]:
    cpu0 = cpu_seconds(pids)
    bodies = [{"prompt": PROMPT, "width": size, "height": size, "steps": steps, "seed": i, "format": "PNG"} for i in range(n)]
    t0 = time.perf_counter()
    ids = []
    for body in bodies:
        r = c.post("/api/generate", json=body)
        r.raise_for_status()
        ids.append(r.json()["task_id"])
    submit_s = time.perf_counter() - t0
    deadline = time.monotonic() + timeout
    finals = []
    for tid in ids:
        while (st := c.get("/api/status", params={"task_id": tid, "wait": 10}).json())["status"] not in ("done", "error", "cancelled"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"drain not over in {timeout}s: {st}")
        if st["status"] != "done":
            raise RuntimeError(f"job {tid} ended {st['status']}: {st.get('message')}")
        finals.append(st)
    cpu1 = cpu_seconds(pids)
    for tid in ids:  # free the results
        c.get("/api/image", params={"task_id": tid, "delete": "true"})
    finals.sort(key=lambda s: s["started_at"])
    starts = [float(s["started_at"]) for s in finals]
    call_end = [float(s["started_at"]) + sum(float(im["seconds"]) for im in s["images"]) for s in finals]
    gaps = [b - a for a, b in zip(call_end, starts[1:], strict=False)]
    return {
        "drain": max(float(s["finished_at"]) for s in finals) - min(starts),
        "submit": submit_s,
        "calls": sum(float(im["seconds"]) for s in finals for im in s["images"]),
        "gaps": gaps,
        "tail": float(finals[-1]["finished_at"]) - call_end[-1],
        "first_wait": starts[0] - float(finals[0]["created_at"]),
        "cpu": {k: cpu1[k] - cpu0[k] for k in cpu0},
    }


def direct_drain(backend: Any, n: int, size: int, steps: int) -> dict[str, float]:
    ctx = NoopContext()
    t0 = time.perf_counter()
    image = None
    for i in range(n):
        image = backend.run(WorkItem("generate", Item(prompt=PROMPT, width=size, height=size, steps=steps, seed=i)), ctx)[0]
    calls = time.perf_counter() - t0
    encode(image, "PNG", 85)  # the server's last job is encoded before its finished_at
    return {"calls": calls, "with_last_encode": time.perf_counter() - t0}


def summed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several drains (or direct runs) of one round as one: times and CPU seconds
    added, gaps pooled, the last run's tail."""
    out: dict[str, Any] = dict(runs[-1])
    for key in ("drain", "submit", "calls", "with_last_encode", "first_wait"):
        if key in out:
            out[key] = sum(r[key] for r in runs)
    if "gaps" in out:
        out["gaps"] = [g for r in runs for g in r["gaps"]]
    if "cpu" in out:
        out["cpu"] = {k: sum(r["cpu"][k] for r in runs) for k in out["cpu"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["memory", "redis"], default="memory")
    p.add_argument("--jobs", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server (OMP_NUM_THREADS)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one drain may take")
    p.add_argument("--pin", action="store_true", help="the measured pipeline on core 0, the API node, Redis and the polling on the rest")
    p.add_argument("--fresh", action="store_true",
                   help="each round on a fresh server and a fresh model process for the direct calls (server.worker.process)")
    p.add_argument("--inner", type=int, default=3, help="with --fresh: alternated drains per round (summed)")
    p.add_argument("--in-process", action="store_true",
                   help="the server runs the model in its process (isolate: false; by default the model has its own)")
    args = p.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.pin and len(cores) < 2:
        p.error("--pin needs two cores or more")
    model_core, other_cores = {cores[0]}, set(cores[1:])
    torch.set_num_threads(args.threads)
    env = {"OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="easel-drain-") as d, ExitStack() as stack:
        tmp = Path(d)
        folder = tp.build_sdxl(tmp / "sdxl")
        raw = sdxl_settings(folder)
        settings = build_settings(raw)  # the direct calls: in this process
        if args.in_process:
            raw = {**raw, "models": {name: {**m, "isolate": False} for name, m in raw["models"].items()}}
        hostmem.tune(settings.host_memory.retain_mib)  # what the server does at start-up
        print(f"drain of {args.jobs} tiny-SDXL jobs ({args.size}x{args.size}, {args.steps} steps, PNG), mode {args.mode}, "
              f"{args.threads} torch thread(s), {args.rounds} alternated rounds" + (", pinned" if args.pin else "")
              + (", the server's model in the server's process" if args.in_process else "")
              + (f", a fresh server and model process each round, alternated {args.inner} times in it" if args.fresh else ""))  # fmt: skip

        def started() -> tuple[RunningServer, dict[str, int]]:
            """A server (or API node, worker node and redis-server), warmed up and laid out."""
            srv, pids = stack.enter_context(cluster(tmp, args.mode, raw, env))
            server_drain(srv.client, 4, args.size, args.steps, args.timeout, pids)  # warm-up (the model's process is up after it)
            if args.pin:
                lay_out(pids, model_core, other_cores)
            return srv, pids

        def direct(backend: Any) -> dict[str, float]:
            if args.pin:  # in this process, this thread makes the calls: the model's core; else it waits, as the worker's loop
                os.sched_setaffinity(0, other_cores if backend.isolated else model_core)
            return direct_drain(backend, args.jobs, args.size, args.steps)

        def server(node: tuple[RunningServer, dict[str, int]]) -> dict[str, Any]:
            if args.pin:
                os.sched_setaffinity(0, other_cores)  # the polling off the worker's model core
            return server_drain(node[0].client, args.jobs, args.size, args.steps, args.timeout, node[1])

        def fresh_round(r: int) -> dict[str, Any]:
            """A fresh server and a fresh model process, both warmed up; their drains
            alternated ``--inner`` times and summed."""
            with ExitStack() as one:
                node = one.enter_context(cluster(tmp, args.mode, raw, env))
                server_drain(node[0].client, 4, args.size, args.steps, args.timeout, node[1])
                if args.pin:
                    lay_out(node[1], model_core, other_cores)
                    os.sched_setaffinity(0, model_core)  # the child is born on the model's core, as the bench's calls run
                child = ModelProcess("sdxl", settings.models["sdxl"], settings)  # as the server runs it, without the server
                child.load()
                one.callback(child.unload)
                if args.pin and child.pid is not None:
                    pin(child.pid, model_core)
                direct_drain(child, 4, args.size, args.steps)
                runs: dict[str, list[dict[str, Any]]] = {"direct": [], "server": []}
                for i in range(args.inner):
                    for which in ("direct", "server") if (r + i) % 2 == 0 else ("server", "direct"):
                        runs[which].append(direct(child) if which == "direct" else server(node))
                inner = [s["drain"] / d["calls"] for s, d in zip(runs["server"], runs["direct"], strict=True)]
                return {**{which: summed(rs) for which, rs in runs.items()}, "inner": inner}

        if not args.fresh:
            node = started()
            backend = create_backend("sdxl", settings.models["sdxl"], settings)
            backend.load()
            stack.callback(backend.unload)
            direct_drain(backend, 4, args.size, args.steps)
        rows = []
        for r in range(args.rounds):
            if args.fresh:
                row = fresh_round(r)
            else:
                order = ("direct", "server") if r % 2 == 0 else ("server", "direct")
                row = {which: direct(backend) if which == "direct" else server(node) for which in order}
            rows.append(row)
            s, dd = row["server"], row["direct"]
            print(
                f"  round {r + 1}: server drain {s['drain']:.3f}s (pipeline calls {s['calls']:.3f}s, gaps sum {sum(s['gaps']):.3f}s "
                f"median {1000 * statistics.median(s['gaps']):.1f} ms max {1000 * max(s['gaps']):.1f} ms, last encode+store "
                f"{1000 * s['tail']:.1f} ms, submit {s['submit']:.3f}s); direct {dd['calls']:.3f}s (+ last encode "
                f"{dd['with_last_encode']:.3f}s); ratio {s['drain'] / dd['calls']:.3f}"
                + (" (" + ", ".join(f"{x:.3f}" for x in row["inner"]) + ")" if "inner" in row else "")
                + "; CPU s during the drain: "
                + ", ".join(f"{k} {v:.2f}" for k, v in s["cpu"].items()), flush=True
            )  # fmt: skip
        m_server = statistics.median(r["server"]["drain"] for r in rows)
        m_direct = statistics.median(r["direct"]["calls"] for r in rows)
        m_calls = statistics.median(r["server"]["calls"] for r in rows)
        m_gaps = statistics.median(sum(r["server"]["gaps"]) for r in rows)
        all_gaps = [g for r in rows for g in r["server"]["gaps"]]
        print(f"  {'measure':44s} {'median s':>9s}")
        print(f"  {'server drain (last finished - first started)':44s} {m_server:9.3f}")
        print(f"  {'  of which pipeline calls in the server':44s} {m_calls:9.3f}")
        print(f"  {'  of which gaps between jobs':44s} {m_gaps:9.3f}")
        print(f"  {'direct: N back-to-back backend.run calls':44s} {m_direct:9.3f}")
        print(f"  per-job gap over all rounds: median {1000 * statistics.median(all_gaps):.2f} ms, "
              f"p90 {1000 * sorted(all_gaps)[int(0.9 * len(all_gaps))]:.2f} ms, max {1000 * max(all_gaps):.2f} ms")  # fmt: skip
        cpu = {k: statistics.median(r["server"]["cpu"][k] for r in rows) for k in rows[0]["server"]["cpu"]}
        print("  CPU seconds per drain (median): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        paired = statistics.median(r["server"]["drain"] / r["direct"]["calls"] for r in rows)
        print(f"  ratio server drain / direct: {m_server / m_direct:.3f}x of the medians, {paired:.3f}x the median of the "
              f"rounds' ratios (target <= 1.05x); server pipeline calls / direct: {m_calls / m_direct:.3f}x")  # fmt: skip
        if len(rows) >= 4:
            q1, _, q3 = statistics.quantiles([r["server"]["drain"] / r["direct"]["calls"] for r in rows], n=4)
            print(f"  the rounds' ratios: quartiles {q1:.3f}-{q3:.3f}, {len(rows)} rounds")
        own = [r["server"]["drain"] / r["server"]["calls"] for r in rows]
        print(f"  server drain / its own pipeline calls: {statistics.median(own):.4f}x (range {min(own):.4f}-{max(own):.4f}): "
              "what the server adds, without the noise between two processes' calls")  # fmt: skip


if __name__ == "__main__":
    main()
