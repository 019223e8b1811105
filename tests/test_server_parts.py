"""Unit tests of the small parts the job path is made of: the worker threads, the
direct PNG writer, the scrape-time metrics, the log formatter, change waits, and the
malloc settings."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import prometheus_client
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server import hostmem
from server.backends.base import WorkItem
from server.jobs import Job
from server.logs import FORMAT, Formatter
from server.metrics import Metrics
from server.threads import LoopThreads
from server.worker import encode, small_png

# --- LoopThreads -----------------------------------------------------------------------


def test_loop_threads_run_off_the_loop_and_return_results_and_exceptions() -> None:
    async def main() -> None:
        threads = LoopThreads(2, "t")
        try:
            loop_thread = threading.get_ident()
            ident = await threads.run(threading.get_ident)
            assert ident != loop_thread
            assert await threads.run(pow, 3, 4) == 81
            with pytest.raises(ZeroDivisionError):
                await threads.run(lambda: 1 / 0)
            # two threads: two blocking calls overlap
            barrier = threading.Barrier(2, timeout=10)
            assert await asyncio.gather(threads.run(barrier.wait), threads.run(barrier.wait)) is not None
        finally:
            threads.shutdown()
        with pytest.raises(RuntimeError, match="shut down"):
            threads.run(int)

    asyncio.run(main())


def test_loop_threads_end_after_shutdown_and_ignore_a_cancelled_caller() -> None:
    release = threading.Event()

    async def main() -> LoopThreads:
        threads = LoopThreads(1, "t")
        fut = threads.run(release.wait, 10)
        fut.cancel()  # the caller goes away; the call runs on and its result is dropped
        release.set()
        assert await threads.run(int, "7") == 7  # the thread is still serving
        threads.shutdown()
        return threads

    threads = asyncio.run(main())
    for t in threads._threads:
        t.join(timeout=10)
        assert not t.is_alive()


# --- small_png -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (16, 16), (37, 5), (128, 128)])
def test_small_png_decodes_to_the_same_pixels(mode: str, size: tuple[int, int]) -> None:
    rng = random.Random(f"{mode}{size}")
    img = Image.frombytes(mode, size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * len(mode))))
    data = small_png(img)
    out = Image.open(io.BytesIO(data))
    out.load()  # Pillow checks each chunk's CRC
    assert (out.format, out.mode, out.size) == ("PNG", mode, size)
    assert out.tobytes() == img.tobytes()
    assert encode(img, "PNG", 85) == data  # small images take this path


def test_large_and_other_images_still_go_through_pillow() -> None:
    big = Image.new("RGB", (256, 256), (10, 20, 30))
    assert encode(big, "PNG", 85) != small_png(big)
    palette = Image.new("P", (8, 8))
    assert Image.open(io.BytesIO(encode(palette, "PNG", 85))).mode == "P"


# --- metrics -------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_render_as_prometheus_client_would() -> None:
    ours = Metrics(lambda: {"m": (3, 1)})
    reg = prometheus_client.CollectorRegistry()
    bounds = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)
    ref_wait = prometheus_client.Histogram("easel_job_wait_seconds", "w", ["model"], buckets=bounds, registry=reg)
    ref_jobs = prometheus_client.Counter("easel_jobs", "j", ["model", "task", "status"], registry=reg)
    for value in (0.0, 0.01, 0.011, 0.3, 7.0, 5000.0):  # on a bound, just over it, over the last
        ours.wait.labels("m").observe(value)
        ref_wait.labels("m").observe(value)
    for status in ("done", "done", "error"):
        ours.jobs.labels("m", "generate", status).inc()
        ref_jobs.labels("m", "generate", status).inc()
    ours.loaded.labels("m").set(1)
    got = _samples(ours.render().decode())
    want = {k: v for k, v in _samples(prometheus_client.generate_latest(reg).decode()).items() if not k[0].endswith("_created")}
    assert want.items() <= got.items()
    assert got[("easel_queue_depth", (("model", "m"),))] == 3
    assert got[("easel_jobs_running", (("model", "m"),))] == 1
    assert got[("easel_model_loaded", (("model", "m"),))] == 1
    with pytest.raises(ValueError, match="labels"):
        ours.jobs.labels("m")


# --- logs ----------------------------------------------------------------------------------


def test_log_formatter_matches_logging_with_the_same_format() -> None:
    ours, std = Formatter(), logging.Formatter(FORMAT)
    for created in (1_790_000_000.0, 1_790_000_000.999, 1_790_000_001.5, 1_790_000_000.25):
        record = logging.makeLogRecord({"name": "easel", "levelname": "INFO", "msg": "job %s", "args": ("x",), "created": created, "msecs": (created % 1) * 1000})
        assert ours.format(record) == std.format(record)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO easel: job x", ours.format(record))
    try:
        raise ValueError("bad")
    except ValueError:
        failed = logging.makeLogRecord({"name": "easel", "levelname": "ERROR", "msg": "failed", "exc_info": sys.exc_info(), "stack_info": "Stack (most recent call last):\n  here"})
    assert ours.format(failed) == std.format(logging.makeLogRecord(failed.__dict__ | {"exc_text": None}))
    assert "ValueError: bad" in ours.format(failed) and ours.format(failed).endswith("here")


# --- change waits --------------------------------------------------------------------------


def test_wait_change_times_out_wakes_on_touch_and_leaves_no_waiter() -> None:
    job = Job(model="m", task="generate", items=[WorkItem(task="generate", prompt="p", width=16, height=16, steps=1, seed=0)])

    async def main() -> None:
        t0 = time.monotonic()
        assert await job.wait_change(0.05) is False
        assert time.monotonic() - t0 >= 0.04
        assert not job._waiters
        waiting = asyncio.ensure_future(job.wait_change(10, progress=False))
        await asyncio.sleep(0)
        job.progressed()  # a step: not a change for progress=False
        await asyncio.sleep(0)
        assert not waiting.done()
        job.touch()
        assert await waiting is True
        assert not job._waiters and not job._status_waiters
        cancelled = asyncio.ensure_future(job.wait_change(10))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not job._waiters

    asyncio.run(main())


# --- malloc settings (server/hostmem.py) ------------------------------------------------

FAULT_PROBE = r"""
import json, resource, sys, threading
from server import hostmem

def faults_per_round():  # 30 MiB of 1 MiB buffers, touched and freed, six times
    out = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        bufs = [bytearray(1 << 20) for _ in range(30)]
        del bufs
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

tuned = hostmem.tune(int(sys.argv[1]))
found = {}
worker = threading.Thread(target=lambda: found.update(thread=faults_per_round()))  # a model's thread
worker.start()
worker.join()
found.update(tuned=tuned, main=faults_per_round())
bufs = [bytearray(1 << 20) for _ in range(64)]
del bufs
found["rss_before_trim"] = rss_mib()
found["trimmed"] = hostmem.trim()
found["rss_after_trim"] = rss_mib()
print(json.dumps(found))
"""


def _probe(retain_mib: int) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", FAULT_PROBE, str(retain_mib)], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parent.parent))  # fmt: skip
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(hostmem._glibc() is None, reason="the malloc settings exist on glibc only")
def test_malloc_settings_keep_freed_memory_for_the_next_job_and_trim_gives_it_back() -> None:
    default, tuned = _probe(0), _probe(512)
    assert default["tuned"] is False and tuned["tuned"] is True
    for where in ("main", "thread"):
        untouched, kept = default[where], tuned[where]
        assert isinstance(untouched, list) and isinstance(kept, list)
        # glibc's defaults give the 30 MiB back after every round and fault it in again
        assert min(untouched[2:]) > 5000, untouched
        # kept: only the first round faults (about 7,700 pages), the rest reuse it
        assert kept[0] > 5000 and max(kept[2:]) < 200, kept
    before, after = tuned["rss_before_trim"], tuned["rss_after_trim"]
    assert isinstance(before, float) and isinstance(after, float)
    assert tuned["trimmed"] is True and before - after > 30, (before, after)
