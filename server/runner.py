"""The runner: the workers of one process.

For every model loaded here, ``target_inflight`` loops each do, one job at a time::

    claim -> run (the model's thread) -> [upscale] -> encode -> store -> finish -> [deliver]

Only ``run`` holds the model: as soon as its pipeline calls return, the loop claims
the next job while this one is upscaled, encoded and stored, so the GPU never waits
for PNG encoding.  ``run_job`` is the one place where a job's outcome is decided:
done, cancelled, failed, or (a worker stopping with jobs of a shared queue)
released back to the queue.

A heartbeat task keeps the leases of the running jobs and the worker's presence
per model in the broker, and stops the jobs the broker says to stop (cancelled on
another node, or lost to another worker).  Every node also runs the broker's
reaper, which puts the jobs of dead workers back in the queue.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from . import deadlines, infotext
from .backends.base import BackendError, JobCancelled, LoraSpec, WorkItem, count_tokens, failure_message
from .backends.isolated import IsolatedBackend
from .broker.base import Broker, BrokerUnavailable, WorkerInfo
from .build import decode_image
from .errors import Conflict
from .forecast import FITS, FORGET, CallTimes, fit_of, measured_phases, observation, prior_vector, with_after_job
from .jobs import PENDING, ImageResult, JobRecord, JobStatus, image_tokens, live_preview_key, preview_key, result_key
from .masking import composite
from .residency import NoRoom, Residency, TooBig, model_device, too_big
from .watchdog import job_limit, stall_message, timeout_message, watch

if TYPE_CHECKING:
    from PIL.Image import Image

    from .config import Settings
    from .delivery.hooks import Delivery
    from .metrics import Metrics
    from .registry import ModelState, Registry
    from .upscaling import Upscaler

log = logging.getLogger("easel")
CLAIM_WAIT_SECONDS = 1.0  # a claim waits this long for work before the loop checks whether to stop
KILLED_CALL_WAIT = 30.0  # seconds a killed model process's blocked call gets to return
LIVE_PREVIEW_INTERVAL = 0.25  # seconds between live previews of one job (at most 4 a second)
LIVE_PREVIEW_REFRESH = 0.5  # how often a running job re-reads whether someone follows its previews
LIVE_PREVIEW_QUALITY = 70  # JPEG quality of live previews


class Stalled(Exception):
    """The job reported no step for its stall limit; ``work`` is its pipeline call, still under way."""

    def __init__(self, message: str, work: asyncio.Future[Any]) -> None:
        super().__init__(message)
        self.work = work


def _consume(work: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome (its job already ended), so nothing warns of it."""
    if not work.cancelled():
        work.exception()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class LoopClock:
    """The CPU seconds the event loop's thread has run, readable from any thread (0
    where the platform cannot say).  Made on the loop's thread."""

    def __init__(self) -> None:
        try:
            self._clock: int | None = time.pthread_getcpuclockid(threading.get_ident())
        except (AttributeError, OSError):  # not on this platform
            self._clock = None

    def seconds(self) -> float:
        return time.clock_gettime(self._clock) if self._clock is not None else 0.0


class JobContext:
    """``StepContext`` for one job (worker thread): maps item-local steps onto the
    job's total and makes progress visible through the broker.

    Previews, one mechanism for two askers: the OpenAI stream's ``partial_images``
    (exactly that many, spread over the steps: blobs ``preview_key(job, k)``, counted
    by the record's ``previews``), and live previews while someone follows the job with
    ``/api/events?previews=true`` (the record's ``preview_wanted_until``, renewed by the
    follower and re-read here every ``LIVE_PREVIEW_REFRESH`` s on the loop): at most one
    every ``LIVE_PREVIEW_INTERVAL`` s, the latest only (blob ``live_preview_key(job)``,
    overwritten; the record's ``preview_seq`` / ``preview_step`` say which)."""

    def __init__(
        self, job: JobRecord, broker: Broker, cancel: threading.Event, loop: asyncio.AbstractEventLoop, clock: LoopClock | None = None
    ) -> None:
        self.job = job
        self.job_id = job.id
        self.broker = broker
        self.cancel = cancel
        self.loop = loop
        self.offset = 0
        self.calls: list[CallTimes] = []  # the pipeline calls' step times, for the forecast's phases
        self.started = time.monotonic()
        self.last_step = self.started  # when the job last reported a step (the watchdog reads it)
        self.clock = clock
        self.loop_mark = clock.seconds() if clock is not None else 0.0  # the loop's CPU seconds at the last step
        self.abandoned = False  # its record was ended without it (stalled): stop at the next step
        self.started_at = job.started_at or broker.now()  # the broker's clock, as the claim set it
        self.preview_steps = preview_steps(job.total_steps, job.partial_images)
        self._previews = 0
        self.live_until = job.preview_wanted_until  # broker clock
        self._live_seq = job.preview_seq
        self._last_live = -LIVE_PREVIEW_INTERVAL  # time.monotonic() of the last live preview
        self._wanted: dict[int, tuple[bool, bool]] = {}  # step -> (partial, live): previews asked for, not handed over yet
        self._asked = 0  # the step of the last ``wants_preview``
        self._flushing = False  # an update of ``extra`` / ``previews`` is in flight
        self._dirty: dict[str, Any] = {}
        self._blobs: list[tuple[str, bytes]] = []

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def step(self, i: int, total: int, at: float | None = None) -> None:
        """``at``: when the step ended (``time.monotonic``), if not now: a model in its
        own process reports its steps a little before the server reads them."""
        now = time.monotonic() if at is None else min(at, time.monotonic())
        self.last_step = now
        if self.clock is not None:
            self.loop_mark = self.clock.seconds()
        if self.calls:
            self.calls[-1].steps.append(now)
        if self.cancel.is_set() or self.abandoned:
            raise JobCancelled()
        job = self.job
        job.step = self.offset + i
        job.last_step_at = self.started_at + (now - self.started)
        if job.first_step_at is None:
            job.first_step_at = job.last_step_at
        self.broker.progress_threadsafe(job)

    def held_up(self) -> float:
        """The CPU seconds the event loop has run since the last step (0 without a clock:
        a model in its own process)."""
        return max(0.0, self.clock.seconds() - self.loop_mark) if self.clock is not None else 0.0

    def wants_preview(self, i: int) -> bool:
        step = self.offset + i
        partial = step in self.preview_steps
        now = time.monotonic()
        live = (
            step < self.job.total_steps  # the last step's image is the result
            and now - self._last_live >= LIVE_PREVIEW_INTERVAL
            and self.live_until > self.started_at + (now - self.started)
        )
        if live:
            self._last_live = now
        self._asked = step
        if partial or live:
            self._wanted[step] = (partial, live)
        return partial or live

    def preview(self, image: Image, i: int | None = None) -> None:
        """The preview asked for by ``wants_preview(i)`` (by default the last asked): a
        partial image (OpenAI ``partial_images``: the blob ``preview_key(job, k)``,
        counted by the record's ``previews``) and/or the live preview (a JPEG,
        ``live_preview_key``).  A model in its own process is asked a step ahead, so
        its preview names its step."""
        step = self._asked if i is None else self.offset + i
        wanted = self._wanted.pop(step, None)
        for older in [s for s in self._wanted if s < step]:  # asked for, never drawn (no latents to show)
            del self._wanted[older]
        if wanted is None:
            return
        partial, live = wanted
        if partial:
            self.loop.call_soon_threadsafe(self._preview_ready, encode(image, self.job.format, self.job.quality))
        if live:
            self.loop.call_soon_threadsafe(self._live_ready, step, encode(image, "JPEG", LIVE_PREVIEW_QUALITY))

    async def follow_previews(self) -> None:
        """Re-read (on the loop) whether someone follows the job's live previews,
        until cancelled: the follower may be another process (an API node)."""
        while True:
            await asyncio.sleep(LIVE_PREVIEW_REFRESH)
            try:
                record = await self.broker.get(self.job_id)
            except BrokerUnavailable:
                continue
            if record is not None:
                self.live_until = record.preview_wanted_until

    def set_extra(self, **values: Any) -> None:
        """Publish backend-specific status (training loss...)."""
        self.loop.call_soon_threadsafe(self._extra_ready, values)

    # event-loop side: one update in flight at a time, the newest values win

    def _preview_ready(self, data: bytes) -> None:
        key = preview_key(self.job_id, self._previews)
        self._previews += 1
        self._push({"previews": self._previews}, (key, data))

    def _live_ready(self, step: int, data: bytes) -> None:
        self._live_seq += 1
        self._push({"preview_seq": self._live_seq, "preview_step": step}, (live_preview_key(self.job_id), data))

    def _extra_ready(self, values: dict[str, Any]) -> None:
        self.job.extra = {**self.job.extra, **values}
        self._push({"extra": dict(self.job.extra)})

    def _push(self, fields: dict[str, Any], blob: tuple[str, bytes] | None = None) -> None:
        self._dirty.update(fields)
        if blob is not None:  # blobs are written in order, before the count that names them
            self._blobs.append(blob)
        if not self._flushing:
            self._flushing = True
            self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._dirty or self._blobs:
                blobs, self._blobs = self._blobs, []
                fields, self._dirty = self._dirty, {}
                for key, data in blobs:
                    await self.broker.put_attempt_blob(self.job_id, self.job.attempt, key, data)  # fenced (issue 32)
                if fields:
                    await self.broker.update(self.job, fields, attempt=self.job.attempt)
        except BrokerUnavailable as exc:
            log.warning("job %s: progress not stored (%s)", self.job_id, exc)
        finally:
            self._flushing = False


def preview_steps(total_steps: int, count: int) -> frozenset[int]:
    """``count`` steps spread evenly over the job, before its last step."""
    return frozenset(s for i in range(count) if 0 < (s := total_steps * (i + 1) // (count + 1)) < total_steps)


def execute(
    backend: Any, job: JobRecord, ctx: JobContext, blobs: dict[str, bytes], max_pixels: int
) -> tuple[list[Image], list[float]]:
    """Run every pipeline call of ``job`` (the model's thread): the images, and the
    seconds of each call."""
    if job.task == "train":
        assert job.train is not None
        if isinstance(backend, IsolatedBackend):  # the pipeline is in the model's process: train there
            return backend.train(job.train, ctx), []
        from .training.lora_trainer import LoraTrainer  # imports torch

        return LoraTrainer(job.train).run(backend, ctx), []
    decoded: dict[str, Image] = {}

    def image(key: str, param: str) -> Image:
        if key not in decoded:
            data = blobs.get(key)
            if data is None:
                raise BackendError(f"{param}: the job's input image is no longer stored (it expired); submit the job again")
            decoded[key] = decode_image(data, param, max_pixels)
        return decoded[key]

    images: list[Image] = []
    seconds: list[float] = []
    text_tokens = ref_tokens = 0
    warnings: list[str] = []
    for n, item in enumerate(job.items):
        work = WorkItem(
            task=job.task,  # type: ignore[arg-type]
            prompt=item.prompt,
            width=item.width,
            height=item.height,
            steps=item.steps,
            seed=item.seed,
            n=item.n,
            negative_prompt=item.negative_prompt,
            guidance=item.guidance,
            images=[image(k, f"images[{i}]") for i, k in enumerate(item.images)],
            init_image=image(item.init_image, "init_image") if item.init_image else None,
            strength=item.strength,
            mask=image(item.mask, "mask").convert("L") if item.mask else None,
            mask_blur=item.mask_blur,
            loras=[LoraSpec(lr.name, lr.scale) for lr in item.loras],
            extra={"scale": item.scale} if item.scale else {},
        )
        tokens, limit = prompt_tokens(backend, job, item.prompt)
        text_tokens += tokens
        if limit is not None and tokens > limit:
            which = "the prompt" if len(job.items) == 1 else f"prompt {n + 1}"
            warnings.append(
                f"{which} is {tokens} tokens but the text encoder of model {job.model!r} takes {limit}: "
                f"the last {tokens - limit} tokens were cut; shorten the prompt"
            )
        refs = [*work.images, *([work.init_image] if work.init_image is not None else [])]
        ref_tokens += sum(image_tokens(im.width, im.height) for im in refs)
        if n == len(job.items) - 1:
            job.text_tokens, job.image_tokens, job.warnings = text_tokens, ref_tokens, warnings
            if warnings:  # shown by the status while the job runs (the finish stores them too)
                ctx.loop.call_soon_threadsafe(ctx._push, {"warnings": list(warnings)})
        start = time.monotonic()
        ctx.calls.append(times := CallTimes(start))
        out = backend.run(work, ctx)
        if work.mask is not None and work.images:  # outside the mask, the original pixels
            out = [composite(im, work.images[0], work.mask, work.mask_blur) for im in out]
        images.extend(out)
        times.end = time.monotonic()
        seconds.append(times.end - start)
        ctx.offset += item.steps
    return images, seconds


def prompt_tokens(backend: Any, job: JobRecord, prompt: str) -> tuple[int, int | None]:
    """(tokens, limit) from the model's tokenizer; words when it cannot say."""
    try:
        return count_tokens(backend, prompt)
    except Exception as exc:  # counting must never fail a job
        log.warning("job %s: could not count the prompt's tokens (%s); counting words", job.id, failure_message(exc))
        return len(prompt.split()), None


def encode(img: Image, fmt: str, quality: int, parameters: str | None = None) -> bytes:
    """``img`` as ``fmt`` bytes; ``parameters`` (an A1111 infotext, server/infotext.py)
    goes into a PNG's ``parameters`` text chunk, or a JPEG's / WEBP's EXIF UserComment."""
    buf = io.BytesIO()
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if fmt == "PNG":
        info = None
        if parameters is not None:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text("parameters", parameters)  # tEXt, or iTXt when not latin-1
        img.save(buf, format="PNG", compress_level=1, pnginfo=info)
    elif parameters is not None:
        img.save(buf, format=fmt, quality=quality, exif=infotext.exif_with(parameters))
    else:
        img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def encode_all(
    job: JobRecord, images: list[Image], item_seconds: list[float], output_dir: str | None, embed: bool = True
) -> tuple[list[ImageResult], dict[str, bytes]]:
    """Encode every image (a thread); with ``storage.output_dir`` set, also write each
    to ``<output_dir>/<task_id>-<index>.<ext>``.  With ``embed`` (``storage.embed_metadata``)
    a generate/edit result carries its parameters (server/infotext.py)."""
    owners = [(item, item.seed + k) for item in job.items for k in range(item.n)]
    embed = embed and job.task in ("generate", "edit") and bool(owners)
    prompts = [item.prompt for item in job.items for _ in range(item.n)] or [""]
    seeds = [item.seed + k for item in job.items for k in range(item.n)] or [0]
    seconds = [round(item_seconds[i] / it.n, 4) if i < len(item_seconds) else None for i, it in enumerate(job.items) for _ in range(it.n)] or [None]
    upload = PENDING if job.upload_urls else None  # delivered after the job is done
    results: list[ImageResult] = []
    blobs: dict[str, bytes] = {}
    for i, img in enumerate(images):
        last = min(i, len(seeds) - 1)  # an upscale or training job may differ from its items
        text = infotext.build(job, *owners[min(i, len(owners) - 1)]) if embed else None
        data = encode(img, job.format, job.quality, text)
        blobs[result_key(job.id, i)] = data
        results.append(
            ImageResult(
                index=i, seed=seeds[last], width=img.width, height=img.height, format=job.format,
                prompt=prompts[last], bytes=len(data), upload=upload, seconds=seconds[last],
            )
        )  # fmt: skip
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for r in results:
            (folder / f"{job.id}-{r.index}.{r.extension}").write_bytes(blobs[result_key(job.id, r.index)])
    return results, blobs


@dataclass(eq=False)
class Running:
    job: JobRecord
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)
    release: bool = False  # stopped to be released back to the queue, not cancelled
    error: str | None = None  # stopped for this reason (a time limit): ends as error, not cancelled
    after_job: bool = False  # claimed while another job's results were being stored here (forecast.TERMS)
    first_call: bool = False  # the first job on its model since the model loaded (forecast.TERMS)
    ctx: JobContext | None = None  # while its pipeline calls run in this process


class Runner:
    def __init__(self, settings: Settings, broker: Broker, registry: Registry, metrics: Metrics) -> None:
        self.settings = settings
        self.broker = broker
        self.registry = registry
        self.metrics = metrics
        self.id = settings.broker.worker_id or worker_id()
        self.lease = settings.broker.lease_seconds
        self.upscaler: Upscaler | None = None
        self.delivery: Delivery | None = None
        self.on_presence: list[Any] = []  # called with a model name when its presence here changes
        self.running: dict[str, Running] = {}
        self._finishing: set[str] = set()  # jobs past their pipeline calls, their results being stored
        self.hung: dict[str, Running] = {}  # stalled jobs whose in-process call has not returned
        self.claiming = True
        self._loops: dict[str, list[asyncio.Task[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._beat: asyncio.Task[None] | None = None
        self.residency = Residency(settings)
        self._loading = asyncio.Lock()  # one residency decision and load at a time
        self._wanted: set[str] = set()  # on-demand models waiting for room (retried as jobs end)
        self._clock: LoopClock | None = None  # made in start(), on the loop's thread

    # ----- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._clock = LoopClock()
        self.broker.on_cancel(self._cancel_asked)
        self.broker.on_command(self._command)
        for name, cfg in self.settings.models.items():
            if cfg.enabled:
                await self.load(name)
        try:  # presence of every model at once (a load_on_demand model's forecast needs it)
            await self._beat_once()
        except BrokerUnavailable:
            pass
        self._beat = asyncio.create_task(self._heartbeat_loop())

    async def load(self, name: str) -> ModelState:
        """Load ``name``, first unloading idle models its device's budget needs room
        from (server/residency.py): ``Conflict`` while busy models stand in the way;
        a model bigger than the budget ends in state error, saying by how much."""
        ms = self.registry.get(name)
        if ms.state in ("loaded", "loading"):
            return ms
        async with self._loading:
            return await self._load(ms)

    async def _load(self, ms: ModelState) -> ModelState:
        name = ms.name
        if ms.state in ("loaded", "loading"):
            return ms
        try:
            evict = self.residency.plan(ms, list(self.registry.models.values()), await self._busy())
        except TooBig as exc:
            ms.state, ms.load_error = "error", str(exc)
            log.warning("model %s: %s", name, exc)
            await self._announce(name)
            return ms
        except NoRoom as exc:
            raise Conflict(str(exc), param="model", code="model_no_room") from None
        for other in evict:
            log.info("model %s: unloading idle model %s (least recently used) to make room", name, other)
            await self.unload(other)
        if any(h.job.model == name for h in self.hung.values()):
            raise Conflict(
                f"model {name!r} is still in a hung pipeline call ({ms.load_error}); "
                "it is unloaded, then loaded again if enabled, when that call returns — or restart the server",
                param="model",
            )
        ms.state = "loading"  # at once: a caller that does not wait sees it
        await self._announce(ms.name)
        ms = await self.registry.load(name)
        if ms.state == "loaded" and (over := self.residency.over(ms, list(self.registry.models.values()))) > 0:
            budget = self.residency.budget(model_device(ms.cfg))
            log.warning("model %s: measured %s MiB; the loaded models exceed their budget (%s MiB) by %.0f MiB", name, ms.size_mib, budget, over)
            if ms.size_mib is not None and budget is not None and ms.size_mib > budget:
                await self.registry.unload(name)
                ms.state, ms.load_error = "error", str(too_big(name, ms.size_mib, model_device(ms.cfg), budget, measured=True))
        if ms.state == "loaded":
            self.residency.touch(name)
        if ms.state == "loaded" and ms.backend is not None:
            priors = {f: prior_vector(p).tolist() for f in FITS if (p := ms.backend.cost_prior(f)) is not None}
            if priors and not ms.cfg.forecast_prior:
                await self.broker.set_priors(name, priors)
            self._loops[name] = [
                asyncio.create_task(self._claim_loop(ms), name=f"easel-{name}-{i}") for i in range(ms.cfg.target_inflight)
            ]
            self.metrics.loaded.labels(name).set(1)
        await self._announce(ms.name)
        return ms

    async def unload(self, name: str) -> ModelState:
        ms = self.registry.get(name)
        loops = self._loops.pop(name, [])
        for r in list(self.running.values()):
            if r.job.model == name:
                r.release = self.broker.distributed
                r.cancel.set()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if not self.broker.distributed and not ms.cfg.load_on_demand:  # nobody else will serve them
            await self._cancel_waiting(name, f"model {name!r} was unloaded before the job ran")
        self.metrics.loaded.labels(name).set(0)
        ms = await self.registry.unload(name)
        await self._announce(name)
        return ms

    async def stop(self, grace: float) -> None:
        """Stop claiming; let running jobs finish within ``grace`` seconds; then stop
        them: released back to a shared queue (distributed), cancelled otherwise."""
        self.claiming = False
        for h in self.hung.values():  # a hung call that heeds cancel may end now
            h.cancel.set()
        if not self.broker.distributed:
            for name in self.registry.models:
                await self._cancel_waiting(name, "the server shut down before the job ran")
        loops = [t for tasks in self._loops.values() for t in tasks]
        if loops:
            _, pending = await asyncio.wait(loops, timeout=grace)
            if pending:
                log.warning("shutdown: grace period over, stopping %d running job(s)", len(self.running))
                for r in list(self.running.values()):
                    r.release = self.broker.distributed
                    r.cancel.set()
                await asyncio.wait(pending, timeout=30)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._beat is not None:
            self._beat.cancel()
        try:
            await self.broker.leave(self.id)
        except BrokerUnavailable:
            pass
        for ms in self.registry.models.values():
            if ms.backend is not None:
                await self.registry.unload(ms.name)

    async def _cancel_waiting(self, model: str, message: str) -> None:
        for job in await self.broker.waiting(model, 2**31):
            await self.broker.cancel(job.id, message)
            log.info("job %s on %s: cancelled (%s)", job.id, model, message)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----- presence, leases, cancel ----------------------------------------------------------

    def infos(self) -> list[WorkerInfo]:
        counts: dict[str, int] = {}
        for r in self.running.values():
            counts[r.job.model] = counts.get(r.job.model, 0) + 1
        return [
            WorkerInfo(
                worker=self.id, model=ms.name, host=socket.gethostname(), state=ms.state, load_error=ms.load_error,
                slots=ms.cfg.target_inflight, running=counts.get(ms.name, 0), load_seconds=ms.load_seconds,
                cold=ms.state == "loaded" and not ms.warm,
            )
            for ms in self.registry.models.values()
        ]  # fmt: skip

    async def _announce(self, model: str) -> None:
        try:
            await self._beat_once()
        except BrokerUnavailable:
            log.warning("the broker is unreachable; the presence of model %s will be sent with the next heartbeat", model)
        for callback in self.on_presence:
            callback(model)

    async def _beat_once(self) -> None:
        running = [(r.job.id, r.attempt) for r in self.running.values()]
        stop = await self.broker.heartbeat(self.infos(), running, self.lease)
        for job_id in stop:
            self._cancel_asked(job_id)

    async def _heartbeat_loop(self) -> None:
        beat = self.settings.broker.heartbeat_seconds
        while True:
            await asyncio.sleep(beat)
            try:
                await self._beat_once()
                await self.broker.reap()
                await self._residency_tick()
            except BrokerUnavailable as exc:
                log.warning("heartbeat: %s", exc)
            except Exception:
                log.exception("heartbeat failed")

    # ----- residency (server/residency.py) ----------------------------------------------------

    async def _busy(self) -> set[str]:
        """Models with waiting or running jobs (never evicted)."""
        busy = {r.job.model for r in self.running.values()}
        for name, ms in self.registry.models.items():
            if name not in busy and ms.state == "loaded" and (await self.broker.depth(name)) != (0, 0):
                busy.add(name)
        return busy

    def want(self, model: str) -> None:
        """A job for ``model`` waits (``Service.submit``, or the heartbeat saw its queue):
        load it if it loads on demand and is not loaded (a task: the caller does not wait)."""
        ms = self.registry.models.get(model)
        if ms is None or not ms.cfg.load_on_demand or ms.state != "unloaded" or not self.claiming:
            return
        self._wanted.add(model)
        if not self._loading.locked():
            self.spawn(self._load_wanted())

    async def _load_wanted(self) -> None:
        """Load the on-demand models that have waiting jobs, as room allows."""
        async with self._loading:
            for name in list(self._wanted):
                ms = self.registry.models[name]
                if ms.state != "unloaded" or not self.claiming:
                    self._wanted.discard(name)
                    continue
                if (await self.broker.depth(name))[0] == 0:
                    self._wanted.discard(name)
                    continue
                try:
                    ms = await self._load(ms)
                except Conflict as exc:  # busy models in the way: retried as jobs end
                    log.info("model %s: waiting for room (%s)", name, exc)
                    continue
                self._wanted.discard(name)
                if ms.state == "error" and await self._nobody_else(name):
                    await self._fail_waiting(name, ms.load_error or "the model failed to load")

    async def _nobody_else(self, model: str) -> bool:
        """No worker (this one included) can serve ``model``: one process, or every
        live worker that presents it reports a load error."""
        if not self.broker.distributed:
            return True
        return all(w.state == "error" for w in await self.broker.workers(model))

    async def _fail_waiting(self, model: str, message: str) -> None:
        for job in await self.broker.waiting(model, 2**31):
            fields = {"message": f"model {model!r} could not be loaded for this job: {message}"}
            if await self.broker.finish(job, JobStatus.ERROR, fields, attempt=None, blobs={}, only_waiting=True):
                log.info("job %s on %s: error (%s)", job.id, model, message)

    async def _residency_tick(self) -> None:
        """Each heartbeat: unload models idle past ``idle_unload_seconds``; load the
        on-demand models whose queue holds jobs (in Redis mode, any worker host may)."""
        busy = await self._busy()
        for name, ms in list(self.registry.models.items()):
            limit = ms.cfg.idle_unload_seconds
            if ms.state == "loaded" and limit is not None and name not in busy and self.residency.idle_for(name) >= limit:
                log.info("model %s: idle for %.1fs (idle_unload_seconds %g); unloading it", name, self.residency.idle_for(name), limit)
                await self.unload(name)
            elif ms.cfg.load_on_demand and ms.state == "unloaded" and (await self.broker.depth(name))[0] > 0:
                self.want(name)
        if self._wanted and not self._loading.locked():
            self.spawn(self._load_wanted())

    def delayed(self, job_id: str) -> float:
        """Seconds a job running in this process is behind what its progress says: the
        CPU time the event loop has run since the job's last step (or its start).  A
        pipeline thread waits for the GIL while the loop runs Python (requests, a
        burst of submissions), so a job that makes no step meanwhile has that much
        more to go; a model in its own process (``isolate: true``) is not held up."""
        r = self.running.get(job_id)
        return r.ctx.held_up() if r is not None and r.ctx is not None else 0.0

    def _cancel_asked(self, job_id: str) -> None:
        r = self.running.get(job_id)
        if r is not None:
            r.cancel.set()

    def _command(self, model: str, action: str) -> None:
        if model not in self.registry.models:
            return
        if action == "load":
            self.spawn(self.load(model))
        elif action == "unload":
            self.spawn(self.unload(model))

    # ----- the job path ------------------------------------------------------------------------

    async def _claim_loop(self, ms: ModelState) -> None:
        """Claim and run jobs of ``ms`` one after the other.  A job's encode-and-store
        (``finishing``) starts once the next claim has been answered: started first, it
        would hold the GIL in its encoding thread while the claim's answer waits to be
        read, and the model would sit idle meanwhile.  A job claimed that way, the
        moment the one before it left the model, is timed from that moment: the claim
        and hand-over between two queued jobs are part of what a job in the queue costs."""
        finishing: Coroutine[Any, Any, None] | None = None
        freed_at = 0.0  # time.monotonic() when this loop's last job left the model
        try:
            while self.claiming and ms.state == "loaded":
                job: JobRecord | None = None
                failure: BrokerUnavailable | None = None
                back_to_back = finishing is not None
                try:  # with a job to finish: one try now, without waiting for work
                    job = await self.broker.claim(ms.name, self.id, self.lease, 0.0 if finishing else CLAIM_WAIT_SECONDS)
                except BrokerUnavailable as exc:
                    failure = exc
                if finishing is not None:
                    self.spawn(finishing)
                    finishing = None
                if failure is not None:
                    log.warning("claim on %s: %s", ms.name, failure)
                    await asyncio.sleep(1.0)
                    continue
                if job is None:
                    continue
                if not self.claiming or ms.state != "loaded":  # stopped (or stalled) during the claim: give it back
                    await self.broker.release(job, job.attempt)
                    return
                finishing = await self.run_job(ms, job, freed_at if back_to_back else None)
                freed_at = time.monotonic()
        finally:
            if finishing is not None:
                self.spawn(finishing)

    async def run_job(self, ms: ModelState, job: JobRecord, since: float | None = None) -> Coroutine[Any, Any, None] | None:
        """Run ``job``'s pipeline calls; what is left of it (``_finish_job``: upscale,
        encode, store, deliver) is returned for the caller to start.  Its worker time
        counts from ``since`` (the previous job left the model then), else from now."""
        self.residency.touch(ms.name)
        try:
            return await self._run_job(ms, job, since)
        finally:
            self.residency.touch(ms.name)
            if self._wanted and not self._loading.locked():  # an on-demand model may fit now
                self.spawn(self._load_wanted())

    async def _run_job(self, ms: ModelState, job: JobRecord, since: float | None) -> Coroutine[Any, Any, None] | None:
        r = self.running[job.id] = Running(job, job.attempt, after_job=bool(self._finishing), first_call=not ms.warm)
        if (missed := deadlines.miss(job, self.broker.now(), job.predicted)) is not None:
            self.running.pop(job.id, None)  # it cannot make it any more: not on the GPU
            await self._end(job, r, JobStatus.ERROR, missed)
            return None
        self.metrics.wait.labels(ms.name).observe(max(0.0, (job.started_at or 0) - job.created_at))
        log.info("job %s on %s: running (attempt %d, waited %.2fs)", job.id, ms.name, job.attempt, (job.started_at or 0) - job.created_at)
        in_process = not isinstance(ms.backend, IsolatedBackend)  # its pipeline thread shares the GIL with the loop
        ctx = JobContext(job, self.broker, r.cancel, asyncio.get_running_loop(), self._clock if in_process else None)
        r.ctx = ctx
        start = since if since is not None else time.monotonic()
        follow = asyncio.create_task(ctx.follow_previews())
        try:
            blobs = {key: data for key in job.inputs if (data := await self.broker.get_blob(key)) is not None}
            images, item_seconds = await self._execute(ms, job, r, ctx, blobs)
            worker_s = time.monotonic() - start  # the next job starts now: this is what a job ahead costs
        except Stalled as exc:  # ended now, without waiting for the hung call
            self.running.pop(job.id, None)
            await self._end(job, r, JobStatus.ERROR, {"message": str(exc)})
            await self._after_stall(ms, r, exc.work)
            return None
        except JobCancelled as exc:  # a training run may say how far it got
            self.running.pop(job.id, None)
            if r.error is not None:  # stopped by a time limit
                await self._end(job, r, JobStatus.ERROR, {"message": r.error})
            elif r.release:
                await self._release(job, r)
            else:
                await self._end(job, r, JobStatus.CANCELLED, {"message": str(exc) or "cancelled while running"})
            return None
        except Exception as exc:  # the job fails, the worker goes on
            self.running.pop(job.id, None)
            if not isinstance(exc, BackendError):
                log.exception("job %s on %s failed", job.id, ms.name)
            await self._end(job, r, JobStatus.ERROR, {"message": failure_message(exc)})
            return None
        finally:
            follow.cancel()
        self.running.pop(job.id, None)
        if not ms.warm:  # its forecasts no longer count the first job's set-up
            ms.warm = True
            self.spawn(self._announce(ms.name))
        phases = measured_phases(ctx.calls, worker_s)
        self._finishing.add(job.id)  # until its results are stored: the next job runs right after it
        return self._finish_job(job, r, images, item_seconds, worker_s, phases, start + worker_s)

    async def _execute(
        self, ms: ModelState, job: JobRecord, r: Running, ctx: JobContext, blobs: dict[str, bytes]
    ) -> tuple[list[Image], list[float]]:
        """The job's pipeline calls on the model's thread, under its time limits
        (server/watchdog.py): past the job timeout it is stopped at its next step
        (``r.error``); stalled, this raises ``Stalled`` at once."""
        call = anyio.to_thread.run_sync(
            execute, ms.backend, job, ctx, blobs, self.settings.limits.max_image_pixels, limiter=ms.limiter
        )
        timeout = job_limit(self.settings, ms.name, "job_timeout_seconds") if job.task != "train" else None
        stall = job_limit(self.settings, ms.name, "stall_seconds")
        if timeout is None and stall is None:
            return await call
        work = asyncio.ensure_future(call)

        def timed_out() -> None:
            assert timeout is not None
            r.error = timeout_message(timeout)
            r.cancel.set()
            log.warning("job %s on %s: over its time limit of %g s (%s); stopping it", job.id, ms.name, timeout.seconds, timeout.key)

        ctx.last_step = started = time.monotonic()
        guard = asyncio.create_task(watch(started, lambda: ctx.last_step, timeout, stall, timed_out))
        try:
            await asyncio.wait((work, guard), return_when=asyncio.FIRST_COMPLETED)
        finally:
            guard.cancel()
        if work.done():
            return work.result()  # type: ignore[no-any-return]
        assert stall is not None
        ctx.abandoned = True  # should the call come back, it stops at its next step
        work.add_done_callback(_consume)
        log.error("job %s on %s: no step for %g s (%s): stalled", job.id, ms.name, stall.seconds, stall.key)
        raise Stalled(stall_message(stall, ms.name, isinstance(ms.backend, IsolatedBackend)), work)

    async def _after_stall(self, ms: ModelState, r: Running, work: asyncio.Future[Any]) -> None:
        """A job of ``ms`` stalled (its record is already ended). An isolated model's
        process is killed and started again; an in-process model is marked error, and
        unloaded (then loaded again if enabled) once the hung call returns."""
        backend = ms.backend
        if isinstance(backend, IsolatedBackend):
            log.warning("model %s: killing its process (pid %s) after a stalled job, then starting it again", ms.name, backend.pid)
            backend.kill()
            await asyncio.wait((work,), timeout=KILLED_CALL_WAIT)
            try:
                if not work.done():
                    raise BackendError(f"its blocked call did not return within {KILLED_CALL_WAIT:g} s of the kill")
                await anyio.to_thread.run_sync(backend.load)
                ms.warm = False  # a new process: its first job sets up again
                log.info("model %s: process restarted (pid %s)", ms.name, backend.pid)
                return
            except Exception as exc:
                ms.load_error = f"model {ms.name!r} could not be restarted after a stalled job: {failure_message(exc)}; load it again"
        else:
            self.hung[r.job.id] = r
            ms.load_error = (
                f"model {ms.name!r} stalled: job {r.job.id} reported no step in time and its pipeline call is still hung; "
                "the model is unloaded when that call returns"
                + (", then loaded again (enabled)" if ms.cfg.enabled else "")
                + " — or restart the server"
            )
            self.spawn(self._recover(ms, r, work))
        ms.state = "error"
        self.metrics.loaded.labels(ms.name).set(0)
        log.error("%s", ms.load_error)
        await self._announce(ms.name)

    async def _recover(self, ms: ModelState, r: Running, work: asyncio.Future[Any]) -> None:
        """Wait for a stalled in-process call to return; then unload the model and,
        if it is enabled, load it again."""
        await asyncio.wait((work,))
        self.hung.pop(r.job.id, None)
        if ms.state != "error" or any(h.job.model == ms.name for h in self.hung.values()):
            return  # changed meanwhile, or another call of the model still hangs
        log.info("model %s: the hung call of job %s returned; unloading the model", ms.name, r.job.id)
        await asyncio.gather(*self._loops.pop(ms.name, []), return_exceptions=True)
        await self.registry.unload(ms.name)
        if ms.cfg.enabled and self.claiming:
            await self.load(ms.name)
        else:
            await self._announce(ms.name)

    async def _finish_job(
        self, job: JobRecord, r: Running, images: list[Image], item_seconds: list[float], worker_s: float,
        phases: tuple[float, float, float] | None, left_at: float,
    ) -> None:  # fmt: skip
        """Upscale, encode and store off the model's critical path, then mark done
        (``left_at``: the ``time.monotonic()`` the job left the model)."""
        try:
            await self._finish(job, r, images, item_seconds, worker_s, phases, left_at)
        finally:
            self._finishing.discard(job.id)

    async def _finish(
        self, job: JobRecord, r: Running, images: list[Image], item_seconds: list[float], worker_s: float,
        phases: tuple[float, float, float] | None, left_at: float,
    ) -> None:  # fmt: skip
        try:
            if job.upscale and self.upscaler is not None:
                images = await self.upscaler.upscale(images, job.upscale, r.cancel)
            results, blobs = await anyio.to_thread.run_sync(
                encode_all, job, images, item_seconds, self.settings.storage.output_dir, self.settings.storage.embed_metadata
            )
        except Exception as exc:
            if isinstance(exc, JobCancelled):
                await self._end(job, r, JobStatus.CANCELLED, {"message": "cancelled while post-processing"})
                return
            if not isinstance(exc, BackendError):
                log.exception("finishing job %s failed", job.id)
            await self._end(job, r, JobStatus.ERROR, {"message": failure_message(exc)})
            return
        fields = {"results": results, "step": job.total_steps, "worker_seconds": round(worker_s, 4), "extra": job.extra,
                  "worker_phases": [round(p, 4) for p in phases] if phases is not None else [],
                  "text_tokens": job.text_tokens, "image_tokens": job.image_tokens, "warnings": job.warnings}  # fmt: skip
        if not await self._end(job, r, JobStatus.DONE, fields, blobs):
            return
        stored = time.monotonic() - left_at  # from leaving the model to done: only the job itself waits for it
        if phases is not None:
            log.debug("job %s: %.3fs on the worker (%.3f before the steps, %.3f steps, %.3f after); forecast %.3fs (%s); "
                      "stored in %.3fs%s", job.id, worker_s, *phases, job.predicted, ", ".join(f"{p:.3f}" for p in job.predicted_phases),
                      stored, ("; right after another job" if r.after_job else "") + ("; the first since the model loaded" if r.first_call else ""))  # fmt: skip
        feats = with_after_job(job.features, r.after_job, r.first_call)
        decayed, added = observation(feats, worker_s, job.predicted, phases, stored)
        await self.broker.observe_cost(job.model, fit_of(job.task), decayed, added, FORGET)
        self.metrics.duration.labels(job.model, job.task).observe(worker_s)
        total = (job.finished_at or time.time()) - job.created_at
        if total > 0:
            self.metrics.forecast_error.labels(job.model).observe(abs(job.expected_at_submit - total) / total)
        if self.delivery is not None and (job.upload_urls or job.webhook_url):
            await self.delivery.deliver(job)

    async def _end(
        self, job: JobRecord, r: Running, status: JobStatus, fields: dict[str, Any], blobs: dict[str, bytes] | None = None
    ) -> bool:
        """Finish the attempt in the broker; False when it was refused (the lease was lost)."""
        if "extra" not in fields and job.extra:
            fields["extra"] = job.extra
        if self.upscaler is not None:  # an /api/upscale job gives the upscaler back before it reads as done
            await self.upscaler.job_done(job)
        try:
            ok = await self.broker.finish(job, status, fields, attempt=r.attempt, blobs=blobs or {})
        except BrokerUnavailable as exc:
            log.error("job %s: could not store its outcome (%s); its lease will expire and it runs again", job.id, exc)
            return False
        if not ok:
            log.warning("job %s: result of attempt %d rejected: the job was lost to another worker or cancelled", job.id, r.attempt)
            return False
        self.metrics.jobs.labels(job.model, job.task, status.value).inc()
        used = fields.get("worker_seconds", time.time() - job.started_at if job.started_at else 0.0)
        self.metrics.gpu_seconds.labels(job.owner or "anonymous", job.model).inc(max(0.0, used))
        took = f" in {time.time() - (job.started_at or time.time()):.2f}s" if job.started_at else ""
        message = fields.get("message")
        log.info("job %s on %s: %s%s%s", job.id, job.model, status.value, took, f" ({message})" if message else "")
        return True

    async def _release(self, job: JobRecord, r: Running) -> None:
        try:
            if await self.broker.release(job, r.attempt):
                log.info("job %s on %s: released back to the queue (the worker is stopping)", job.id, job.model)
        except BrokerUnavailable as exc:
            log.error("job %s: could not be released (%s); its lease will expire and it runs again", job.id, exc)

