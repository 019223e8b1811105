"""The job record: what a job is and where it stands, as one serialisable Struct.

A ``JobRecord`` can leave the process: the broker stores it (in memory, or as a
Redis hash of JSON fields, one per Struct field) and every API node and worker
reads the same record.  It holds no live objects: reference images, masks and
results are blob keys and metadata; the bytes sit in the broker's blob store.
Futures, events and threads belong to the process that owns them (the broker's
change waiters, the worker's cancel flags), never to the record.
"""

from __future__ import annotations

import enum
import secrets
from typing import Any

import msgspec
from msgspec import Struct

from .items import Item
from .training.plan import TrainPlan

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
PENDING = "pending"  # a delivery (upload, webhook) not yet attempted or in flight


class JobStatus(str, enum.Enum):
    WAITING = "waiting"  # queued on its model
    RUNNING = "running"  # claimed by a worker (or its results being encoded)
    DONE = "done"  # results available
    ERROR = "error"  # failed; ``message`` says why
    CANCELLED = "cancelled"  # cancelled by a client or at shutdown

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELLED)


class ImageResult(Struct, kw_only=True):
    """A result image's metadata; its bytes are the blob ``result_key(job_id, index)``."""

    index: int
    seed: int
    width: int
    height: int
    format: str
    prompt: str
    bytes: int
    seconds: float | None = None  # generation time: its pipeline call's seconds / n
    upload: str | None = None  # pending / ok / failed: reason (with upload_urls)
    gone: str | None = None  # why the bytes are no longer there (fetched with delete=true, evicted)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


IMAGE_TOKEN_BASE, IMAGE_TOKEN_TILE, TILE = 85, 170, 512


def image_tokens(width: int, height: int) -> int:
    """The tokens an image counts in OpenAI usage: 85 + 170 per started 512x512 tile
    at its own size (OpenAI's vision tile rule, without its resizing)."""
    return IMAGE_TOKEN_BASE + IMAGE_TOKEN_TILE * (-(-width // TILE)) * (-(-height // TILE))


def new_id() -> str:
    return secrets.token_hex(8)


def result_key(job_id: str, index: int) -> str:
    return f"img:{job_id}:{index}"


def preview_key(job_id: str, index: int) -> str:
    return f"prev:{job_id}:{index}"


def live_preview_key(job_id: str) -> str:
    """The latest live preview of a running job (``/api/events?previews=true``), overwritten."""
    return f"prev:{job_id}:live"


def input_key(job_id: str, name: str) -> str:
    return f"in:{job_id}:{name}"


class JobRecord(Struct, kw_only=True):
    # --- what was asked (set at submission) ---
    model: str
    task: str  # generate, edit, train, upscale
    items: list[Item] = []
    id: str = msgspec.field(default_factory=new_id)
    priority: int = 0
    format: str = "PNG"
    quality: int = 85
    metadata: dict[str, Any] | None = None
    upscale: int | None = None  # generate/edit: upscale the results by 2 or 4
    upload_urls: list[str] | None = None
    webhook_url: str | None = None
    train: TrainPlan | None = None
    owner: str | None = None  # id of the API key that submitted it (never the key)
    share: str = ""  # its fair-share key within its priority (the owner's key id; "" under queue.fairness "fifo")
    weight: int = 1  # that key's fair-share weight (auth: KeyConfig.weight)
    base_url: str = ""  # the server's URL as the submitter saw it (webhook payloads)
    inputs: list[str] = []  # blob keys of the uploaded images, deleted with the job
    deadline_at: float | None = None  # done by then, or refused / ended as error before it runs
    partial_images: int = 0  # previews asked for (OpenAI stream): blobs preview_key(id, k)
    batch: str = ""  # jobs of one model with the same non-empty key may share a pipeline call (``batch_key``)
    # --- forecast at submission ---
    features: list[float] = []  # features.FEATURES summed over the pipeline calls
    predicted: float = 0.0  # forecast worker seconds of the job itself
    predicted_phases: list[float] = []  # of which: before the steps, the steps, after them (features.PHASES)
    expected_at_submit: float = 0.0
    pos_at_submit: int = 0
    # --- where it stands (broker clock: wall seconds as the broker tells them) ---
    status: JobStatus = JobStatus.WAITING
    seq: int = 0  # arrival order, set by the broker
    attempt: int = 0  # bumped by every claim: the fencing token of the running attempt
    lost: int = 0  # times a worker lost it (its lease expired)
    worker: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    first_step_at: float | None = None
    last_step_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int = 0
    message: str | None = None
    code: str | None = None  # why it failed, for programs (deadline_missed...)
    worker_seconds: float | None = None  # on the worker from when the model was free for it, encoding excluded: what forecasts learn
    worker_phases: list[float] = []  # of which: before the steps, the steps, after them (as measured)
    previews: int = 0  # partial images stored so far
    followed_until: float | None = None  # someone streams its progress (SSE) until then: steps are written at once
    preview_wanted_until: float = 0.0  # someone follows the job with previews=true until then
    preview_seq: int = 0  # live previews stored so far (the latest is the blob live_preview_key(id))
    preview_step: int = 0  # the step the latest live preview shows
    results: list[ImageResult] = []
    webhook: str | None = None  # pending / ok / failed: reason (with webhook_url)
    extra: dict[str, Any] = {}  # backend/training status (loss...)
    # --- counted by the worker (the model's tokenizer; OpenAI usage) ---
    text_tokens: int | None = None  # prompt tokens as the text encoder sees them, over all items
    image_tokens: int | None = None  # tokens of the reference images (openai_shim.image_tokens)
    warnings: list[str] = []  # e.g. a prompt cut to the text encoder's length

    @property
    def task_length(self) -> int:
        return sum(item.n for item in self.items)

    @property
    def progress(self) -> float:
        if self.status is JobStatus.DONE:
            return 1.0
        if self.total_steps <= 0:
            return 0.0
        return min(1.0, self.step / self.total_steps)

    @property
    def seed(self) -> int | None:
        if self.items:
            return self.items[0].seed
        return self.train.seed if self.train is not None else None

    @property
    def delivering(self) -> bool:
        """True while uploads or the webhook of a finished job are still under way."""
        return self.webhook == PENDING or any(r.upload == PENDING for r in self.results)


def batch_key(job: JobRecord, batches: bool) -> str:
    """What jobs must share to run in one pipeline call (""): a generate of one item,
    no reference or init image, no mask, on a family that ``batches``
    (``families.Family.batches``); the same size, steps, guidance, strength, sampler,
    schedule and LoRA set, and a negative prompt in all or none.  Prompts, negative prompts, seeds and
    ``n`` may differ.  The step cache (``cache``) too: one call runs with it or without."""
    if not batches or job.task != "generate" or len(job.items) != 1 or job.upscale is not None:
        return ""
    it = job.items[0]
    if it.images or it.init_image or it.mask:
        return ""
    loras = ",".join(f"{lr.name}:{lr.scale:g}" for lr in it.loras)
    sampling = f"{it.sampler}|{it.scheduler}"
    return f"{it.width}x{it.height}|{it.steps}|{it.guidance}|{it.strength}|{sampling}|{loras}|{it.negative_prompt is not None}|{it.cache}"


# the record's fields, for brokers that store one field per key (Redis hashes)
FIELDS: tuple[str, ...] = JobRecord.__struct_fields__
