"""Every wire type of the job API as a msgspec Struct: the single source of truth
for decoding, validation messages and the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from msgspec import Meta, Struct, UnsetType

Prompt = Annotated[str, Meta(description="What to draw. Must not be empty.", examples=["a lighthouse at dusk"])]
Dimension = Annotated[
    int, Meta(ge=16, le=8192, multiple_of=16, description="Pixels; a positive multiple of 16.")
]
Steps = Annotated[int, Meta(ge=1, le=10_000, description="Denoising steps.")]
Quality = Annotated[int, Meta(ge=1, le=100, description="JPEG/WEBP quality.")]
SeedInt = Annotated[int, Meta(ge=0, le=2**63 - 1)]
PriorityInt = Annotated[int, Meta(ge=-1_000_000, le=1_000_000)]
Seed = Annotated[
    Union[SeedInt, str],
    Meta(description="Integer seed (or a numeric string). Random when absent; the seed used is reported."),
]
Priority = Annotated[
    Union[bool, PriorityInt],
    Meta(description="true jumps ahead of every non-priority job; an int orders jobs, lower first (false = 0, true = -1)."),
]
Format = Annotated[str, Meta(description="PNG, JPEG or WEBP.", examples=["PNG"])]


class ImageRef(Struct, forbid_unknown_fields=True, kw_only=True):
    """A reference image given as a data URL or fetched from a URL."""

    data_url: str | None = None
    url: str | None = None
    name: str | None = None


ImageInput = Annotated[
    Union[str, ImageRef],
    Meta(description="A data URL, a bare base64 string, or {data_url} / {url}."),
]


Pad = Annotated[int, Meta(ge=0, le=4096, description="Pixels added on this side.")]


class Expand(Struct, forbid_unknown_fields=True, kw_only=True):
    """Outpainting: pad the first reference image by these pixels and fill the new
    area (the result's width and height must be multiples of 16)."""

    left: Pad = 0
    right: Pad = 0
    top: Pad = 0
    bottom: Pad = 0


class LoraRef(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(description="Adapter name inside the model's lora_dir.")]
    scale: Annotated[float, Meta(ge=-4, le=4)] = 1.0


class GenerateRequest(Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Text-to-image (and, with ``images``, an edit)."""

    prompt: Prompt | None = None
    prompts: Annotated[list[str], Meta(description="A batch: one job, n images per prompt; seeds increment by one per image.")] | None = None
    model: str | None = None
    negative_prompt: str | None = None
    seed: Seed | None = None
    width: Dimension | None = None
    height: Dimension | None = None
    steps: Steps | None = None
    guidance: float | None = None
    sampler: Annotated[str, Meta(
        description="An A1111 sampler name the model runs (e.g. Euler a, DPM++ 2M; GET /api/ls lists each model's; "
                    "an older name with a schedule, DPM++ 2M Karras, works too). Default: the model's own scheduler.",
        examples=["DPM++ 2M"])] | None = None  # fmt: skip
    scheduler: Annotated[str, Meta(
        description="An A1111 schedule (Automatic, Uniform, Karras, Exponential, SGM Uniform) for the sampler. "
                    "Default: Automatic (the sampler's own: DPM++ 2M runs Karras, else the model's).",
        examples=["Karras"])] | None = None  # fmt: skip
    n: Annotated[int, Meta(ge=1, le=64, description="Images per prompt.")] = 1
    format: Format = "PNG"
    quality: Quality = 85
    priority: Priority = False
    images: list[ImageInput] | None = None
    init_image: ImageInput | None = None
    strength: Annotated[float, Meta(ge=0, le=1)] | None = None
    mask: Annotated[
        ImageInput,
        Meta(description="Edits: the area of images[0] to repaint, the same size as it: fully transparent pixels (a mask "
             "without alpha: white) are repainted, the rest comes back unchanged. Or a multipart file field mask."),
    ] | None = None
    mask_blur: Annotated[int, Meta(ge=0, le=256, description="Feather (px) inside the mask's edge over which the result fades into the original; default 4.")] | None = None
    expand: Annotated[Expand, Meta(description="Edits: outpaint, padding images[0] by these pixels; the original area comes back unchanged.")] | None = None
    loras: list[LoraRef] | None = None
    upscale: Literal[2, 4] | None = None
    cache: Annotated[
        Literal["off", "fast"],
        Meta(description="The model's step cache for this job: 'fast' reuses the later transformer blocks' work on steps whose "
             "first block barely changed (fewer passes, slightly different pixels), 'off' runs every block. Only on a model "
             "whose settings enable it (step_cache), where it is the default; elsewhere a 400 (cache_unavailable)."),
    ] | None = None
    upload_urls: list[str] | None = None
    webhook_url: str | None = None
    metadata: dict[str, Any] | None = None
    deadline_seconds: Annotated[float, Meta(gt=0, description="Refuse the job (422) unless it is forecast to be done within this many seconds; a queued job that can no longer make it ends as error (deadline_missed) before it runs.")] | None = None
    deadline_at: Annotated[float, Meta(gt=0, description="The same as an absolute unix time.")] | None = None


class UpscaleRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Upscale one image with the configured upscaler (loaded on demand)."""

    image: ImageInput
    scale: Literal[2, 4] = 4
    format: Format = "PNG"
    quality: Quality = 85
    model: Annotated[str, Meta(description="An upscale_esrgan model; default: the settings' upscaler.")] | None = None
    priority: Priority = False
    metadata: dict[str, Any] | None = None


class LoadRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    model: str


class MoveRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    to: Annotated[
        Literal["front", "back"],
        Meta(description="front or back of the caller's own waiting jobs at the job's priority; an admin's front: first of its priority."),
    ]


class SubmitResponse(Struct, kw_only=True):
    task_id: str
    task_length: Annotated[int, Meta(description="Number of images the job will produce.")]
    expected_time_seconds: Annotated[float, Meta(description="Forecast seconds from now until the job is done.")]
    pos: int = 0
    status: str = "waiting"
    seed: int | None = None


class ImageInfo(Struct, kw_only=True):
    index: int
    seed: int
    width: int
    height: int
    format: str
    prompt: str
    bytes: int
    url: str
    upload: Annotated[str, Meta(description="With upload_urls: pending, ok, or failed: <reason>.")] | None = None
    seconds: Annotated[float, Meta(description="Generation seconds: the image's pipeline call divided by n.")] | None = None
    steps: Annotated[int, Meta(description="Denoising steps of this image (a batch's total_steps counts every prompt's).")] | None = None


class JobStatusResponse(Struct, kw_only=True, omit_defaults=False):
    task_id: str
    status: Literal["waiting", "running", "done", "error", "cancelled"]
    model: str
    task: str
    pos: int
    # absent (not null) when no worker serves the model: seed 003's polling client reads .get("wait_remaining", 1)
    wait_remaining: Annotated[float | UnsetType, Meta(description="Forecast seconds until the job is done; absent when no live worker serves the model (message says so).")]
    expected_time_seconds: float
    progress: Annotated[float, Meta(ge=0, le=1)]
    step: int
    total_steps: int
    task_length: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    seed: int | None = None
    message: str | None = None
    images: list[ImageInfo] = []
    metadata: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None
    webhook: Annotated[str, Meta(description="With webhook_url: pending, ok, or failed: <reason>.")] | None = None
    attempt: Annotated[int, Meta(description="How many times a worker has started the job (a worker lost mid-job: it runs again).")] = 0
    worker: Annotated[str, Meta(description="The worker running (or that ran) the job.")] | None = None
    gpu_seconds: Annotated[float, Meta(description="Worker time the finished job used: what its key's quota is charged.")] | None = None
    deadline_at: Annotated[float, Meta(description="The job's deadline (unix time), if it has one.")] | None = None
    code: Annotated[str, Meta(description="Why an error job failed, for programs: e.g. deadline_missed.")] | None = None
    warnings: Annotated[list[str], Meta(description="What the job did differently from what was asked, e.g. a prompt cut to the text encoder's length (counted on the worker).")] = []
    paused: Annotated[bool, Meta(description="A waiting job whose model's queue an admin paused: it starts once the queue resumes; wait_remaining is absent meanwhile.")] = False
    prompt: Annotated[str, Meta(description="The prompt (of its first image); null for training jobs and private entries.")] | None = None
    width: Annotated[int, Meta(description="The size of its (first) images; null for training jobs.")] | None = None
    height: int | None = None
    private: Annotated[bool, Meta(description="Another key's job in a shared listing (/api/tasks?scope=shared): shown without its prompt, images, metadata, seed and webhook.")] = False


class PngInfoRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """POST /api/png-info as JSON (or multipart with the file in the field ``image``)."""

    image: Annotated[str, Meta(description="The image file as a data URL or base64.")] | None = None


class PngInfoResponse(Struct, kw_only=True, omit_defaults=False):
    """The parameters an image carries (A1111 infotext: PNG ``parameters`` chunk, or
    JPEG/WEBP EXIF UserComment), as /api/generate fields; all null when it has none."""

    parameters: Annotated[str, Meta(description="The raw text; null when the image carries no parameters.")] | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: Annotated[float, Meta(description="A1111's CFG scale.")] | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    loras: Annotated[list[LoraRef], Meta(description="From <lora:name:scale> in the prompt.")] | None = None
    strength: Annotated[float, Meta(description="A1111's Denoising strength (edits).")] | None = None
    sampler: Annotated[str, Meta(description="A1111's Sampler.")] | None = None
    scheduler: Annotated[str, Meta(description="A1111's Schedule type.")] | None = None


class TasksResponse(Struct, kw_only=True):
    queue: Annotated[list[JobStatusResponse], Meta(description="Running, then waiting jobs (at most limit waiting per model).")]
    recent: Annotated[list[JobStatusResponse], Meta(description="Finished jobs, the most recent first: one page of at most limit.")]
    queue_total: Annotated[int, Meta(description="How many unfinished jobs the caller may list.")] = 0
    recent_total: Annotated[int, Meta(description="How many finished jobs the caller may list (kept for queue.result_ttl_seconds).")] = 0
    next_cursor: Annotated[str, Meta(description="Pass as cursor for the next page of recent; null on the last page.")] | None = None
    scope: Annotated[str, Meta(description="Whose jobs are listed: own, shared (every key's queued jobs, the others' private) or all (admins).")] = "own"


class ImageBase64(Struct, kw_only=True):
    image: str
    format: str


class ClearResponse(Struct, kw_only=True):
    cancelled: int


class CancelResponse(Struct, kw_only=True):
    task_id: str
    status: str


class WorkerView(Struct, kw_only=True):
    worker: str
    host: str
    state: str
    slots: int
    running: int
    load_error: str | None = None


class ModelInfo(Struct, kw_only=True):
    name: str
    backend: str
    state: Literal["unloaded", "loading", "loaded", "error"]
    tasks: list[str]
    max_images: int
    max_output_images: int
    max_pixels: int
    default_width: int
    default_height: int
    recommended_steps: int | None
    recommended_guidance: float | None
    samplers: Annotated[list[str], Meta(description="The sampler names /api/generate's sampler takes for this model (none: it runs its own scheduler only).")] = []
    schedulers: Annotated[list[str], Meta(description="The schedules its samplers take (scheduler).")] = []
    queue_depth: int
    running: int
    load_error: str | None = None
    vram_estimate_mib: int | None = None
    size_mib: Annotated[float | None, Meta(description="Measured size after its last load in this process (residency budgets).")] = None
    load_seconds: Annotated[float | None, Meta(description="Mean seconds a load of the model took (added to forecasts while it is not loaded).")] = None
    forecast: dict[str, Any] | None = None
    workers: Annotated[list[WorkerView], Meta(description="The live workers that serve this model, as they last reported.")] = []
    paused: Annotated[bool, Meta(description="An admin paused the model's queue (or every queue): running jobs finish, new ones queue but none starts.")] = False


class PauseResponse(Struct, kw_only=True):
    """The paused queues after POST /v1/admin/queue/pause or /resume."""

    all: Annotated[bool, Meta(description="Every queue is paused.")]
    models: Annotated[list[str], Meta(description="The models whose own queue is paused (they stay paused when every queue resumes).")]


class ModelsResponse(Struct, kw_only=True):
    default_model: str | None
    models: list[ModelInfo]


class HealthResponse(Struct, kw_only=True):
    status: str
    models: list[ModelInfo]
    devices: list[dict[str, Any]]
    uptime_seconds: float
    broker: Annotated[str, Meta(description="memory (one process) or redis (shared by API nodes and workers).")] = "memory"
    role: Annotated[str, Meta(description="all, api or worker.")] = "all"


class Healthz(Struct):
    status: str


class Readiness(Struct, kw_only=True):
    status: Annotated[str, Meta(description="ready (200) or not_ready (503).")]
    broker: Annotated[str, Meta(description="ok, or why the broker cannot be reached.")]
    models: Annotated[dict[str, str], Meta(description="Nodes with workers: each enabled model's state.")] = {}
    problems: Annotated[list[str], Meta(description="What keeps the node from being ready.")] = []


class ErrorDetail(Struct, kw_only=True, omit_defaults=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    # deadline_unreachable: when the job is forecast to finish, and the earliest deadline that would do
    forecast_finish_at: float | None = None
    earliest_deadline_at: float | None = None
    earliest_deadline_seconds: float | None = None
    # unavailable, on a submit whose outcome the broker did not tell: the job's id
    # (GET /api/status says whether it was queued; it cannot be queued any more)
    task_id: str | None = None
    # not_allowed: the key's setting (allow-list) the request is outside of (max_steps, models...)
    limit: str | None = None


class ErrorResponse(Struct, kw_only=True):
    error: ErrorDetail
