"""What a burst of requests costs the job running in the server's process (run by hand).

    python bench/bench_burst.py [--family flux2_klein] [--trials 8] [--in-process]

``bench_forecast.py``'s first job of a burst runs longer than its forecast while the
other fifteen are submitted. This measures where that goes. One tiny-pipeline server
(``tests/tiny_server.py``, one torch thread) and one stub server; after six warm-up
jobs, ``--trials`` rounds of the same edit (96x96, 4 steps, one reference) as the
first job of:

- ``alone``: nothing else;
- ``same``: fifteen jobs of the family's mix submitted to the same server right after it;
- ``other``: the same fifteen submitted to the stub server instead (the bench's own
  work as in ``same``, none for the model's server);
- ``healthz``: fifteen ``GET /healthz`` to the same server.

It prints the median of the first job's worker time (the server's debug line per
job) for each. The model runs in its own process, as served by default, where the
server's requests do not share its GIL; ``--in-process`` runs it in the server's
process (``isolate: false``).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_forecast import FAMILIES, data_url, settings  # noqa: E402
from tests.servers import RunningServer, start_server, stub_settings  # noqa: E402

KINDS = ("alone", "same", "other", "healthz")


def worker_seconds(srv: RunningServer, job_id: str) -> float:
    m = re.search(rf"job {job_id}: ([\d.]+)s on the worker", srv.log())
    if m is None:
        raise RuntimeError(f"job {job_id}: no worker line in the server log")
    return float(m[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="flux2_klein", choices=[f for f in FAMILIES if f != "stub"])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--in-process", action="store_true", help="run the model in the server's process (isolate: false)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="easel-bench-") as d:
        cfg, mix, model = settings(args.family, Path(d))
        cfg = {**cfg, "log_level": "debug", "models": {n: {**m, "isolate": not args.in_process} for n, m in cfg["models"].items()}}
        srv = start_server(Path(d), cfg, env={"EASEL_TEST_THREADS": "1"}, script=ROOT / "tests" / "tiny_server.py")
        other = start_server(Path(d), stub_settings(simulate_step_seconds=1000.0, max_pixels=256 * 256))
        try:
            other.client.post(
                "/api/generate", json={"prompt": "hold", "width": 256, "height": 256, "steps": 50}
            ).raise_for_status()
            c, rng = srv.client, random.Random(1)

            def submit(route: str, body: dict[str, object]) -> str:
                r = c.post(f"/api/{route}", json={**body, "model": model})
                r.raise_for_status()
                return str(r.json()["task_id"])

            def wait(job_id: str) -> None:
                while c.get("/api/status", params={"task_id": job_id, "wait": 30}).json()["status"] not in (
                    "done",
                    "error",
                    "cancelled",
                ):
                    pass

            for _ in range(6):
                wait(submit(*mix(rng)))
            first = {
                "prompt": "a lighthouse at dusk",
                "width": 96,
                "height": 96,
                "steps": 4,
                "n": 1,
                "seed": 1,
                "images": [data_url(96, 1)],
            }
            route = "edit" if args.family in ("flux2_klein", "qwen_edit") else "generate"
            if route == "generate":
                first.pop("images")
            times: dict[str, list[float]] = {k: [] for k in KINDS}
            for _ in range(args.trials):
                for kind in KINDS:
                    burst = [mix(rng) for _ in range(15)]  # made first, as bench_forecast.py does
                    job = submit(route, first)
                    followers = []
                    if kind == "same":
                        followers = [submit(r, b) for r, b in burst]
                    elif kind == "other":
                        for r, b in burst:
                            other.client.post(f"/api/{r}", json={**b, "model": "stub"}).raise_for_status()
                    elif kind == "healthz":
                        for _ in burst:
                            c.get("/healthz").raise_for_status()
                    for j in [job, *followers]:
                        wait(j)
                    times[kind].append(worker_seconds(srv, job))
        finally:
            srv.stop()
            other.stop()
    where = "in the server's process" if args.in_process else "in its own process"
    print(f"{args.family}, the model {where}: the first job's worker time, median of {args.trials}")
    for kind, ts in times.items():
        print(f"  {kind:8s} {1000 * statistics.median(ts):6.0f} ms  ({' '.join(f'{1000 * t:.0f}' for t in ts)})")


if __name__ == "__main__":
    main()
