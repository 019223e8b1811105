"""The per-model worker loop.

Each loaded model runs ``target_inflight`` loops; each loop takes the next job from
the model's queue and runs its pipeline calls in a worker thread (never on the
event loop).  Steps are recorded on the job from the worker thread; the loop is
woken (``call_soon_threadsafe``) only when someone follows progress or previews.
When the backend returns, the images are handed to a separate finishing task
(post-processing, encoding, storing) and the loop takes the next job at once, so
the GPU does not wait for PNG encoding.
"""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.base import BackendError, JobCancelled
from .jobs import PENDING, ImageResult, Job, JobStatus

if TYPE_CHECKING:
    from PIL.Image import Image

    from .backends.base import Backend
    from .engine import Engine
    from .registry import ModelState

log = logging.getLogger("easel")
INLINE_ENCODE_PIXELS = 128 * 128  # below this, encoding costs less than a thread hand-off
# an image hook looks at a job whose pipeline calls are done and returns the
# post-processing to run on its images before they are encoded (upscaling), if any
ImageStep = Callable[[list["Image"]], Awaitable[list["Image"]]]
ImageHook = Callable[[Job], ImageStep | None]


class JobContext:
    """``StepContext`` for one job: maps item-local steps onto the job's total."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, offset: int = 0) -> None:
        self.job = job
        self.loop = loop
        self.offset = offset

    @property
    def cancelled(self) -> bool:
        return self.job.cancel_event.is_set()

    def step(self, i: int, total: int) -> None:
        job = self.job
        if job.cancel_event.is_set():
            raise JobCancelled()
        # plain attribute stores (the job is RUNNING until this thread returns); the
        # event loop is woken only when someone follows progress, since every wake-up
        # takes the GIL from the pipeline
        job.step = self.offset + i
        job.last_step_mono = time.monotonic()
        if job.followed:
            self.loop.call_soon_threadsafe(job.progressed)

    def wants_preview(self, i: int) -> bool:
        return self.job.preview_sink is not None and (self.offset + i) in self.job.preview_steps

    def preview(self, image: Image) -> None:
        sink = self.job.preview_sink
        if sink is not None:
            sink(image)

    def set_extra(self, **values: Any) -> None:
        """Publish backend-specific status (training loss...)."""
        self.loop.call_soon_threadsafe(_record_extra, self.job, values)


def _record_extra(job: Job, values: dict[str, Any]) -> None:
    job.extra.update(values)
    job.touch()


def execute(backend: Backend, job: Job, ctx: JobContext) -> list[Image]:
    """Run every pipeline call of ``job`` (worker thread)."""
    runner = job.options.get("runner")
    if runner is not None:  # training and other non-generation jobs bring their own
        return runner(backend, job, ctx)  # type: ignore[no-any-return]
    images: list[Image] = []
    for item in job.items:
        start = time.monotonic()
        images.extend(backend.run(item, ctx))
        job.item_seconds.append(time.monotonic() - start)
        ctx.offset += item.steps
    return images


def failure_message(exc: BaseException) -> str:
    """A sentence for the client; tracebacks stay in the log."""
    if isinstance(exc, BackendError):
        return str(exc)
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return (
            "the GPU ran out of memory for this job; try a smaller size, fewer images or "
            "reference images, or set offload to 'model' for this model"
        )
    return f"the model failed on this job ({name}: {str(exc)[:300]}); the server log has the details"


def encode(img: Image, fmt: str, quality: int) -> bytes:
    if fmt == "PNG" and img.mode in _PNG_COLOR_TYPES and img.width * img.height <= INLINE_ENCODE_PIXELS:
        return small_png(img)
    buf = io.BytesIO()
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if fmt == "PNG":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


_PNG_COLOR_TYPES = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}  # mode -> (PNG colour type, bytes per pixel)


def small_png(img: Image) -> bytes:
    """A PNG of a small 8-bit L, RGB or RGBA image, written directly: no row filters
    and zlib level 1, which for a thumbnail-sized image costs a fifth of Pillow's
    ``save`` (its per-call set-up outweighs the pixels) for a file of about the same size."""
    color_type, bpp = _PNG_COLOR_TYPES[img.mode]
    w, h = img.size
    raw = img.tobytes()
    stride = w * bpp
    rows = b"".join(b"\x00" + raw[y : y + stride] for y in range(0, h * stride, stride))  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(rows, 1)), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


async def worker_loop(engine: Engine, ms: ModelState) -> None:
    while True:
        job = await ms.queue.get()
        if job is None:
            return
        await run_job(engine, ms, job)


async def run_job(engine: Engine, ms: ModelState, job: Job) -> None:
    backend = ms.backend
    assert backend is not None and ms.executor is not None
    engine.mark_running(ms, job)
    ctx = JobContext(job, asyncio.get_running_loop())
    try:
        images = await ms.executor.run(execute, backend, job, ctx)
        # the next job starts now, while this one is encoded: the worker's time is
        # what a job ahead in the queue costs
        job.worker_seconds = time.monotonic() - (job.started_mono or 0.0)
    except JobCancelled as exc:  # a runner may say how far it got
        engine.finish(ms, job, JobStatus.CANCELLED, str(exc) or "cancelled while running")
        return
    except Exception as exc:  # the job fails, the worker goes on
        if not isinstance(exc, BackendError):
            log.exception("job %s on %s failed", job.id, ms.name)
        engine.finish(ms, job, JobStatus.ERROR, failure_message(exc))
        return
    steps = [step for hook in engine.image_hooks if (step := hook(job)) is not None]
    if steps or not _encode_inline(engine, images):
        engine.spawn(finish_job(engine, ms, job, images, steps))
        return
    try:  # nothing to wait for, and a few small images: cheaper than a task
        encoded = _encode_all(job, images)
    except Exception as exc:
        _failed_finishing(engine, ms, job, exc)
        return
    job.results = encoded
    engine.finish(ms, job, JobStatus.DONE)


async def finish_job(engine: Engine, ms: ModelState, job: Job, images: list[Image], steps: list[ImageStep]) -> None:
    """Post-process and encode off the worker's critical path, then mark done."""
    try:
        for step in steps:
            images = await step(images)
        if _encode_inline(engine, images):
            encoded = _encode_all(job, images)
        else:
            output_dir = engine.settings.storage.output_dir
            encoded = await engine.encoder.run(_encode_all, job, images, output_dir)
    except Exception as exc:
        _failed_finishing(engine, ms, job, exc)
        return
    job.results = encoded
    engine.finish(ms, job, JobStatus.DONE)


def _encode_inline(engine: Engine, images: list[Image]) -> bool:
    """Whether to encode on the event loop: a few small images cost less than a hand-off
    to the encoder threads (which also write ``storage.output_dir``)."""
    return engine.settings.storage.output_dir is None and sum(img.width * img.height for img in images) <= INLINE_ENCODE_PIXELS


def _failed_finishing(engine: Engine, ms: ModelState, job: Job, exc: Exception) -> None:
    if isinstance(exc, JobCancelled):
        engine.finish(ms, job, JobStatus.CANCELLED, "cancelled while post-processing")
        return
    if not isinstance(exc, BackendError):
        log.exception("finishing job %s failed", job.id)
    engine.finish(ms, job, JobStatus.ERROR, failure_message(exc))


def _encode_all(job: Job, images: list[Image], output_dir: str | None = None) -> list[ImageResult]:
    """Encode every image (encoder thread, or inline for tiny ones); with
    ``storage.output_dir`` set, also write each to ``<output_dir>/<task_id>-<index>.<ext>``."""
    prompts = [item.prompt for item in job.items for _ in range(item.n)]
    seeds = [item.seed + k for item in job.items for k in range(item.n)]
    timed = job.item_seconds
    seconds = [round(timed[i] / it.n, 4) if i < len(timed) else None for i, it in enumerate(job.items) for _ in range(it.n)]
    upload = PENDING if job.options.get("upload_urls") else None  # the done hooks deliver them
    out = []
    for i, img in enumerate(images):
        last = min(i, len(seeds) - 1)  # runners may return more images than items
        out.append(
            ImageResult(
                index=i,
                seed=seeds[last],
                width=img.width,
                height=img.height,
                format=job.format,
                prompt=prompts[last],
                data=encode(img, job.format, job.quality),
                upload=upload,
                seconds=seconds[last],
            )
        )
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for r in out:
            assert r.data is not None
            (folder / f"{job.id}-{r.index}.{r.extension}").write_bytes(r.data)
    return out
