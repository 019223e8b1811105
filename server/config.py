"""Settings: the shipped default (``default_settings.json``) deep-merged with a local
override file, validated into msgspec Structs.

A bad file stops start-up with ``ConfigError`` naming the key and what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .config_auth import AuthConfig, allow_list_problem
from .families import FAMILIES, UPSCALERS
from .features import FEATURES, unknown_terms
from .forwarded import parse_networks
from .model_checks import model_problem

DEFAULT_SETTINGS = Path(__file__).with_name("default_settings.json")

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegFloat = Annotated[float, Meta(ge=0)]
NonNegInt = Annotated[int, Meta(ge=0)]


class ConfigError(Exception):
    """A settings file that cannot be used; the message names the key."""


class ModelConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    backend: str  # a family of server/families.py (checked by build_settings)
    enabled: bool = False
    target_inflight: Annotated[int, Meta(ge=1, le=64)] = 1  # the most jobs one batched pipeline call runs
    batch_max_delay: Annotated[float, Meta(ge=0, le=10)] = 0.1  # a batch may finish a job it overtakes this fraction later
    batch_wait_ms: Annotated[float, Meta(ge=0, le=10_000)] = 0.0  # the most a job waits for companions, when the forecast says it pays
    model_path: str | None = None
    base_model_path: str | None = None
    transformer_path: str | None = None
    transformer_config_path: str | None = None
    vae_path: str | None = None  # SDXL: a VAE folder (e.g. an fp16-fixed VAE) loaded in place of the pipeline's
    tasks: list[Literal["generate", "edit"]] = []
    max_images: Annotated[int, Meta(ge=0, le=64)] = 1
    max_output_images: Annotated[int, Meta(ge=1, le=64)] = 4
    max_pixels: PositiveInt = 2_097_152  # 2 MP (e.g. 1448x1448)
    default_width: Annotated[int, Meta(ge=16, multiple_of=16)] = 1024
    default_height: Annotated[int, Meta(ge=16, multiple_of=16)] = 1024
    recommended_steps: PositiveInt | None = None
    recommended_guidance: float | None = None
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"  # auto -> cuda if available, else mps, else cpu
    # where seeded noise is drawn: "cpu" (one seed gives one image on any GPU and any worker) or "device"
    rng: Literal["cpu", "device"] = "cpu"
    vram_estimate_mib: int | None = None
    offload: Literal["none", "model", "sequential"] = "none"
    # where from_pretrained puts the weights as it reads them: "auto" = straight onto a CUDA device when offload is
    # "none" (Diffusers' device_map), else into host memory and then moved; "device" = straight there or a config
    # error; "off" = always through host memory (backends/weights.py)
    device_map: Literal["auto", "device", "off"] = "auto"
    quantization: Literal["none", "fp8", "fp8dq"] = "none"  # fp8: weight-only; fp8dq: float8 matmuls (CUDA, Hopper)
    quantize_text_encoder: bool = False  # with quantization: the text encoder too, float8 weight-only (FLUX.2-klein's Qwen3)
    vae_tiling: bool = False
    vae_slicing: bool = False
    lora_dir: str | None = None
    isolate: bool | None = None  # run the model in its own process (null: every backend but the stub and upscalers)
    default_strength: Annotated[float, Meta(ge=0, le=1)] = 0.35
    keep_loaded: bool = True  # upscalers: stay loaded after a job
    tile_size: Annotated[int, Meta(ge=0)] = 512  # upscalers: input tile edge in px; 0 = no tiling
    # stub only: seconds per denoising step at one megapixel (per image)
    simulate_step_seconds: NonNegFloat = 0.0
    # stub only: seconds per denoising step of a pipeline call however many images it makes (what a batch shares)
    simulate_call_step_seconds: NonNegFloat = 0.0
    # forecast prior: seconds per unit of each term of server/forecast.py's TERMS
    # (job, step, step_mp, decode_mp, ...); missing terms are 0
    forecast_prior: dict[str, NonNegFloat] | None = None
    # time limits of this model's jobs (server/watchdog.py): null = limits' value, 0 = none
    job_timeout_seconds: NonNegFloat | None = None
    stall_seconds: NonNegFloat | None = None
    # residency (server/residency.py): a job for this model, not loaded, loads it (and waits)
    load_on_demand: bool = False
    idle_unload_seconds: Annotated[float, Meta(gt=0)] | None = None  # unloaded after this long with no job
    lora_cache_size: NonNegInt = 4  # LoRA adapters kept loaded (switched per job); 0 = removed after each job
    lora_max_rank: PositiveInt = 64  # compile "regional": LoRAs are swapped in place, their ranks padded to this (backends/lora.py)
    # speed knobs (backends/speed.py): Diffusers' attention backend of the denoiser; regional torch.compile
    attention_backend: str = "native"
    compile: Literal["off", "regional"] = "off"
    # first-block cache: a step whose first block's output moved less than the threshold (relative) reuses the
    # previous step's residual of the other blocks (Qwen-Image-Edit)
    step_cache: Literal["off", "first_block"] = "off"
    step_cache_threshold: Annotated[float, Meta(gt=0)] = 0.05
    prompt_cache_size: NonNegInt = 8  # text-encoder outputs of recent prompts kept per model (backends/prompt_cache.py); 0 = off
    simulate_size_mib: NonNegFloat | None = None  # stub only: its "measured" size for residency budgets
    simulate_load_seconds: NonNegFloat = 0.0  # stub only: how long a load takes
    simulate_first_call_seconds: NonNegFloat = 0.0  # stub only: what the first job after a load takes more (warm-up)
    simulate_peak_mib: NonNegFloat = 0.0  # stub only: what a job holds beyond simulate_size_mib at its peak (residency)
    simulate_faults: bool = False  # stub only, for tests: the prompts 'fail', 'hang [N]' and 'device fault' misbehave


class ResidencyConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    # MiB the loaded models of this process may use per device ("cuda:0", "cpu" = host RAM);
    # a device not named has no budget. Loading past it unloads least recently used idle models
    memory_budget_mib: dict[str, PositiveInt] = {}


class QueueConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    capacity: PositiveInt = 10_000  # waiting jobs per model
    result_ttl_seconds: Annotated[float, Meta(gt=0)] = 3600.0
    result_memory_mib: PositiveInt = 1024  # encoded images kept in memory
    shutdown_grace_seconds: NonNegFloat = 30.0
    # within a priority: "fair" takes the keys' jobs in turns (weighted by each key's
    # weight; anonymous callers count as one key), "fifo" in arrival order
    fairness: Literal["fair", "fifo"] = "fair"


class LimitsConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    max_body_mib: PositiveInt = 64
    max_steps: PositiveInt = 200
    max_prompts: PositiveInt = 64
    max_image_pixels: PositiveInt = 40_000_000  # decoded reference images
    # text fields (server/textcheck.py): each prompt (prompt, negative_prompt, each of prompts),
    # metadata as JSON, and any other text (names, URLs, paths); beyond them a 400 names the field
    max_prompt_chars: PositiveInt = 32_000
    max_metadata_bytes: PositiveInt = 262_144
    max_text_chars: PositiveInt = 8_192
    # a running job past this many seconds stops at its next step, as an error (null = no limit)
    job_timeout_seconds: Annotated[float, Meta(gt=0)] | None = None
    # a running job that reports no step for this long ends as an error; its model is
    # restarted (isolate) or marked error until the hung call returns (null = off)
    stall_seconds: Annotated[float, Meta(gt=0)] | None = None


class MetricsConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    # with keys configured, /metrics needs a key unless this is true; an anonymous scrape
    # then sees GPU-seconds per model only, never per key
    public: bool = False


class HttpConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    # origins (scheme://host[:port]) whose pages may call the API from a browser; "*" = any,
    # "null" = pages opened from file://. Empty (the default): same origin only, no CORS headers
    cors_origins: list[str] = []
    # the base of every URL easel hands out (image links in statuses, OpenAI url answers,
    # webhooks), e.g. "https://images.example.com/"; default: as the request names this server
    public_url: str | None = None
    # addresses or networks of reverse proxies whose X-Forwarded-Proto/-Host/-For are believed
    trusted_proxies: list[str] = []


class StorageConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    output_dir: str | None = None  # also write every result to disk when set
    # results carry their parameters (A1111 infotext: PNG text chunk, JPEG/WEBP EXIF); false for privacy
    embed_metadata: bool = True


class TrainingConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    dataset_roots: list[str] = []


class HostMemoryConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    # glibc: freed memory each arena keeps for the next job instead of returning it to
    # the kernel (0 = glibc's defaults); unloading a model still returns it (server/hostmem.py)
    retain_mib: NonNegInt = 512


class BrokerConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    # "memory": this process only (the default); "redis://HOST:PORT/DB": shared by any
    # number of API nodes and worker hosts (see README, Scaling out)
    url: str = "memory"
    role: Literal["all", "api", "worker"] = "all"  # api: HTTP only; worker: models only
    lease_seconds: Annotated[float, Meta(gt=0)] = 15.0  # a running job's lease; a dead worker's jobs rerun after it
    heartbeat_seconds: Annotated[float, Meta(gt=0)] = 2.0  # leases and presence are renewed this often
    prefix: str = "easel:"  # of every Redis key: several easels can share one Redis
    # a call to Redis that has no answer after this long fails: the API answers 503 with
    # Retry-After at once instead of hanging while Redis is stalled
    timeout_seconds: Annotated[float, Meta(gt=0)] = 2.0
    worker_id: str | None = None  # default: host:pid:random


class DeliveryConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    allowed_hosts: list[str] = []
    timeout_seconds: Annotated[float, Meta(gt=0)] = 30.0
    max_download_mib: PositiveInt = 32
    retries: Annotated[int, Meta(ge=0, le=10)] = 3
    backoff_seconds: NonNegFloat = 1.0  # first retry delay; doubles on each retry
    # a webhook that keeps failing is tried again (from any node) until this long after
    # its job ended; then its status reads failed
    give_up_seconds: NonNegFloat = 3600.0
    # Standard Webhooks signing key ("whsec_" + base64); the EASEL_WEBHOOK_SECRET
    # environment variable, when set, takes its place (keeps the secret out of files)
    webhook_secret: str | None = None


class Settings(Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 4030
    models: dict[str, ModelConfig] = {}
    default_model: str | None = None
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    training: TrainingConfig = msgspec.field(default_factory=TrainingConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    host_memory: HostMemoryConfig = msgspec.field(default_factory=HostMemoryConfig)
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    residency: ResidencyConfig = msgspec.field(default_factory=ResidencyConfig)
    upscaler: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False  # uvicorn's per-request lines; job state changes are always logged

    def model(self, name: str | None) -> tuple[str, ModelConfig]:
        key = name or self.default_model
        if key is None or key not in self.models:
            raise KeyError(key)
        return key, self.models[key]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``; nested objects merge key by key,
    everything else (lists included) is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"settings file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object at the top level")
    return data


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret ("whsec_" + base64 of 24-64 bytes)."""
    make = "make one with: python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
    if not secret.startswith("whsec_"):
        raise ValueError(f"must start with 'whsec_' (Standard Webhooks format); {make}")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError(f"is not valid base64 after 'whsec_'; {make}") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"must encode 24 to 64 bytes, not {len(key)}; {make}")
    return key


def build_settings(data: dict[str, Any], source: str = "settings") -> Settings:
    models = data.get("models")
    if isinstance(models, dict):  # validate one by one so the message names the model
        for name, model in models.items():
            backend = model.get("backend") if isinstance(model, dict) else None
            if isinstance(backend, str) and backend not in FAMILIES:
                raise ConfigError(
                    f"{source}: backend {backend!r} is not one easel serves (one of: {', '.join(FAMILIES)}) "
                    f"- at `$.models.{name}.backend`"
                )
            try:
                msgspec.convert(model, ModelConfig)
            except msgspec.ValidationError as exc:
                text = str(exc).replace("`$", f"`$.models.{name}")
                if "`$" not in text:
                    text += f" - at `$.models.{name}`"
                raise ConfigError(f"{source}: {text}") from exc
    try:
        settings = msgspec.convert(data, Settings)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.models.x.max_pixels`"
        raise ConfigError(f"{source}: {exc}") from exc
    if "*" in settings.models:
        raise ConfigError(f"{source}: a model may not be named '*' (it stands for every queue in pause and resume); rename it")
    if settings.default_model is None and settings.models:
        settings.default_model = next(iter(settings.models))
    if settings.default_model is not None and settings.default_model not in settings.models:
        raise ConfigError(
            f"{source}: default_model {settings.default_model!r} is not one of the configured "
            f"models ({', '.join(settings.models) or 'none'})"
        )
    if settings.delivery.webhook_secret is not None:
        try:
            webhook_key(settings.delivery.webhook_secret)
        except ValueError as exc:
            raise ConfigError(f"{source}: delivery.webhook_secret {exc}") from None
    broker = settings.broker
    if broker.url != "memory" and not broker.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{source}: broker.url {broker.url!r} must be 'memory' or a redis:// URL such as redis://127.0.0.1:6379/0")
    if broker.url == "memory" and broker.role != "all":
        raise ConfigError(
            f"{source}: broker.role {broker.role!r} needs a shared broker: set broker.url (or --broker) to a redis:// URL"
        )
    for origin in settings.http.cors_origins:
        if origin not in ("*", "null") and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"{source}: http.cors_origins entry {origin!r} must be an origin such as "
                "'http://localhost:8080' (scheme and host, no path or trailing slash), '*' or 'null'"
            )
    if (public := settings.http.public_url) is not None:
        if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", public):
            raise ConfigError(f"{source}: http.public_url {public!r} must be an http(s) URL such as 'https://images.example.com/'")
        settings.http.public_url = public.rstrip("/") + "/"
    try:
        parse_networks(settings.http.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"{source}: http.trusted_proxies {exc}") from None
    if broker.heartbeat_seconds >= broker.lease_seconds:
        raise ConfigError(f"{source}: broker.heartbeat_seconds must be shorter than broker.lease_seconds")
    for name, model in settings.models.items():
        if model.quantization != "none" and not FAMILIES[model.backend].quantizes:
            quantizing = " and ".join(k for k, f in FAMILIES.items() if f.quantizes)
            raise ConfigError(
                f"{source}: models.{name}.quantization {model.quantization!r}: only the {quantizing} backend quantizes "
                f"(backend {model.backend!r} would load unquantized); set it to 'none', or use an FP8 single-file "
                "transformer (transformer_path)"
            )
        if (problem := model_problem(name, model)) is not None:
            raise ConfigError(f"{source}: {problem}")
        if model.isolate and not FAMILIES[model.backend].isolatable:
            raise ConfigError(
                f"{source}: models.{name}.isolate: an upscaler runs in the server's process (jobs call it image by "
                "image); remove isolate or set it to false"
            )
        if model.forecast_prior is not None and (unknown := unknown_terms(model.forecast_prior)):
            raise ConfigError(
                f"{source}: models.{name}.forecast_prior: unknown terms {unknown}; the terms are {', '.join(FEATURES)}"
            )
    if settings.upscaler is not None and settings.upscaler not in settings.models:
        raise ConfigError(f"{source}: upscaler {settings.upscaler!r} is not a configured model")
    if settings.upscaler is not None and settings.models[settings.upscaler].backend not in UPSCALERS:
        raise ConfigError(f"{source}: upscaler {settings.upscaler!r} must be a model with backend {' or '.join(map(repr, UPSCALERS))}")
    if (problem := allow_list_problem(settings.auth, settings.models)) is not None:
        raise ConfigError(f"{source}: {problem}")
    return settings


def load_settings(
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Shipped default <- local override file <- CLI overrides.

    ``config_path`` None means ``local.json`` in the working directory when present.
    """
    data = _read_json(DEFAULT_SETTINGS)
    sources = [str(DEFAULT_SETTINGS.name)]
    if config_path is None:
        local = Path("local.json")
        config_path = local if local.exists() else None
    if config_path is not None:
        data = deep_merge(data, _read_json(Path(config_path)))
        sources.append(str(config_path))
    if overrides:
        data = deep_merge(data, overrides)
        sources.append("command line")
    if secret := os.environ.get("EASEL_URL_SECRET"):
        data = deep_merge(data, {"auth": {"url_secret": secret}})
        sources.append("EASEL_URL_SECRET")
    if secret := os.environ.get("EASEL_WEBHOOK_SECRET"):
        data = deep_merge(data, {"delivery": {"webhook_secret": secret}})
        sources.append("EASEL_WEBHOOK_SECRET")
    return build_settings(data, " + ".join(sources))
