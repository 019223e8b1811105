"""Unit tests of the small parts the job path is made of: decoding input images,
failure messages, result encoding, metrics, change waits, and the malloc settings."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server import hostmem
from server.backends.base import BackendError, failure_message, out_of_memory
from server.broker.notify import Notifier
from server.build import OFF_LOOP_PIXELS, decode_off_loop
from server.errors import BadRequest
from server.metrics import Metrics
from server.worker.encode import encode

# --- decoding input images --------------------------------------------------------------


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((side, side)).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _loop_turns_while_decoding(data: bytes) -> int:
    """How often the event loop ran something else while ``decode_off_loop`` decoded."""

    async def main() -> int:
        turns, done = 0, asyncio.Event()

        async def other_work() -> None:
            nonlocal turns
            while not done.is_set():
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.ensure_future(other_work())
        await asyncio.sleep(0)  # it starts
        before = turns
        try:
            await decode_off_loop(data, "images[0]", 1 << 30)
        finally:
            done.set()
            await ticker
        return turns - before

    return asyncio.run(main())


def test_a_large_reference_is_decoded_while_the_event_loop_goes_on() -> None:
    side = 2048
    assert side * side > OFF_LOOP_PIXELS
    assert _loop_turns_while_decoding(_png(side)) > 0


def test_a_small_reference_is_decoded_at_once_on_the_loop() -> None:
    assert _loop_turns_while_decoding(_png(64)) == 0  # no hand-over to a thread: it costs more than the decode


def test_a_large_reference_that_will_not_decode_is_a_400() -> None:
    data = _png(2048)
    with pytest.raises(BadRequest, match=r"images\[0\]: could not decode the image data"):
        asyncio.run(decode_off_loop(data[: len(data) // 2], "images[0]", 1 << 30))


# --- failure messages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "oom", "says"),
    [
        (MemoryError(), True, "out of host memory (RAM)"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"), True, "host memory"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True, "the GPU ran out of memory"),
        (BackendError("reference image 1 is 8x8; each side must be at least 16 px"), False, "reference image 1 is 8x8"),
        (ValueError("shapes do not match"), False, "the model failed on this job (ValueError: shapes do not match)"),
    ],
)
def test_failures_are_told_apart_and_said_as_a_sentence(exc: BaseException, oom: bool, says: str) -> None:
    assert out_of_memory(exc) is oom
    assert says in failure_message(exc)


def test_torch_out_of_memory_is_out_of_memory() -> None:
    import torch

    exc = torch.OutOfMemoryError("Tried to allocate 80.00 GiB")
    assert out_of_memory(exc)
    assert "offload" in failure_message(exc)


# --- encoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_png_results_decode_to_the_same_pixels(mode: str) -> None:
    img = Image.linear_gradient("L").resize((37, 5)).convert(mode)
    out = Image.open(io.BytesIO(encode(img, "PNG", 85)))
    assert (out.format, out.mode, out.size) == ("PNG", mode, img.size)
    assert out.tobytes() == img.tobytes()


def test_jpeg_of_an_rgba_image_drops_the_alpha() -> None:
    img = Image.new("RGBA", (16, 16), (200, 10, 10, 128))
    out = Image.open(io.BytesIO(encode(img, "JPEG", 90)))
    assert (out.format, out.mode) == ("JPEG", "RGB")


# --- metrics -------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_jobs_and_show_the_brokers_queue_depths() -> None:
    ours = Metrics()
    for value in (0.0, 0.3, 7.0):
        ours.wait.labels("m").observe(value)
    for status in ("done", "done", "error"):
        ours.jobs.labels("m", "generate", status).inc()
    ours.loaded.labels("m").set(1)
    got = _samples(ours.render({"m": (3, 1)}).decode())
    assert got[("easel_jobs_total", (("model", "m"), ("status", "done"), ("task", "generate")))] == 2
    assert got[("easel_job_wait_seconds_count", (("model", "m"),))] == 3
    assert got[("easel_job_wait_seconds_bucket", (("le", "0.5"), ("model", "m")))] == 2
    assert got[("easel_queue_depth", (("model", "m"),))] == 3
    assert got[("easel_jobs_running", (("model", "m"),))] == 1
    assert got[("easel_model_loaded", (("model", "m"),))] == 1
    assert Metrics().render({}) != b""  # each app has its own registry: no clash between two


# --- change waits --------------------------------------------------------------------------


def test_wait_times_out_wakes_on_a_change_and_leaves_no_waiter() -> None:
    notifier = Notifier()

    async def main() -> None:
        t0 = time.monotonic()
        assert await notifier.wait("j", 0.05) is False
        assert time.monotonic() - t0 >= 0.04
        assert not notifier.followed("j")
        waiting = asyncio.ensure_future(notifier.wait("j", 10, progress=False))
        await asyncio.sleep(0)
        notifier.changed("j", progress_only=True)  # a step: not a change for progress=False
        await asyncio.sleep(0)
        assert not waiting.done()
        notifier.changed("j")
        assert await waiting is True
        follower = asyncio.ensure_future(notifier.wait("j", 10))
        await asyncio.sleep(0)
        assert notifier.followed("j")
        notifier.changed_all()
        assert await follower is True
        cancelled = asyncio.ensure_future(notifier.wait("j", 10))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not notifier.followed("j")

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
