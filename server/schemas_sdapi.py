"""Wire types of A1111's ``/sdapi/v1`` as easel answers it (``routes/sdapi.py``).

Requests accept every field A1111 clients send (unknown fields too: none is a 422);
the fields easel honours are declared here, the rest are listed as ignored in the
answer's ``info``."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct

Count = Annotated[int, Meta(ge=1, le=64)]


class SdTxt2ImgRequest(Struct, kw_only=True):
    """POST /sdapi/v1/txt2img: A1111's body; every other A1111 field is accepted and
    ignored (listed in ``info.ignored``)."""

    prompt: Annotated[str, Meta(description="What to draw; <lora:NAME:SCALE> tags apply the model's LoRA NAME.")] = ""
    negative_prompt: str = ""
    seed: Annotated[int, Meta(description="-1: random. Image k of the batch gets seed + k.")] = -1
    batch_size: Annotated[Count, Meta(description="Images per pipeline call.")] = 1
    n_iter: Annotated[Count, Meta(description="Pipeline calls (batches).")] = 1
    steps: Annotated[int, Meta(ge=1, le=10_000)] | None = None
    cfg_scale: float | None = None
    width: Annotated[int, Meta(description="A multiple of 16; default: the model's.")] | None = None
    height: Annotated[int, Meta(description="A multiple of 16; default: the model's.")] | None = None
    sampler_name: Annotated[str, Meta(description="A sampler of GET /sdapi/v1/samplers; another is accepted, listed in "
                                                  "info.ignored, and the model runs its own scheduler (info.sampler_honoured).")] | None = None
    sampler_index: Annotated[str, Meta(description="The sampler, when sampler_name is not given (A1111's older field).")] | None = None
    scheduler: Annotated[str, Meta(description="A schedule of GET /sdapi/v1/schedulers (Automatic: the sampler's own).")] | None = None
    override_settings: Annotated[dict[str, Any], Meta(description="sd_model_checkpoint picks the model for this request.")] | None = None
    send_images: bool = True
    priority: Annotated[bool | int, Meta(description="easel: as in /api/generate.")] = False


class SdImg2ImgRequest(SdTxt2ImgRequest, kw_only=True):
    """POST /sdapi/v1/img2img: with ``mask`` an inpaint (an easel edit with a mask);
    without, img2img (``init_image`` + ``strength``, or an edit on edit-only models)."""

    init_images: Annotated[list[str], Meta(description="Base64 PNG/JPEG/WEBP or data URLs; the first is the image.")] = []
    mask: Annotated[str, Meta(description="White = repaint, black = keep (A1111's convention); resized to the image.")] | None = None
    denoising_strength: Annotated[float, Meta(ge=0, le=1)] | None = None
    mask_blur: Annotated[int, Meta(ge=0, le=256)] | None = None
    inpainting_mask_invert: Annotated[int, Meta(ge=0, le=1, description="1: black = repaint.")] = 0
    include_init_images: bool = False


class SdImagesResponse(Struct, kw_only=True):
    images: Annotated[list[str], Meta(description="Base64 PNG images.")]
    parameters: Annotated[dict[str, Any], Meta(description="The request as received.")]
    info: Annotated[str, Meta(description="A JSON string: seed, all_seeds, infotexts, ... and easel's task_id and ignored fields.")]


class SdProgressState(Struct, kw_only=True):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class SdProgressResponse(Struct, kw_only=True, omit_defaults=False):
    progress: Annotated[float, Meta(description="0..1 of the caller's current job.")]
    eta_relative: Annotated[float, Meta(description="Seconds until the current job is done (easel's forecast).")]
    state: SdProgressState
    current_image: Annotated[str, Meta(description="Base64 PNG: the live preview of the running job.")] | None = None
    textinfo: str | None = None


class SdOptionsRequest(Struct, kw_only=True):
    """POST /sdapi/v1/options: only ``sd_model_checkpoint`` is honoured (for the calling
    key's later sdapi jobs); other options are accepted and ignored."""

    sd_model_checkpoint: str | None = None


class SdModel(Struct, kw_only=True):
    title: str
    model_name: str
    hash: Annotated[str, Meta(description="A hash of the model's name (not of its weights).")]
    sha256: str
    filename: str
    config: str | None = None


class SdNamed(Struct, kw_only=True):
    """A sampler or scheduler name A1111 clients offer."""

    name: str
    label: str
    aliases: list[str] = []
    options: dict[str, Any] = {}


class SdUpscaler(Struct, kw_only=True):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float = 4.0


class SdLora(Struct, kw_only=True):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = {}


class SdVae(Struct, kw_only=True):
    model_name: str
    filename: str


class SdPngInfoRequest(Struct, kw_only=True):
    image: Annotated[str, Meta(description="Base64 or a data URL.")]


class SdPngInfoResponse(Struct, kw_only=True, omit_defaults=False):
    info: Annotated[str, Meta(description="The infotext ('' when the image has none).")]
    items: dict[str, Any]
    parameters: Annotated[dict[str, Any], Meta(description="The infotext parsed into A1111's keys (Prompt, Steps, Seed, ...).")]


class SdExtraSingleImageRequest(Struct, kw_only=True):
    """POST /sdapi/v1/extra-single-image: upscale one image with the configured upscaler."""

    image: Annotated[str, Meta(description="Base64 or a data URL.")]
    upscaling_resize: Annotated[float, Meta(description="2 or 4 (other factors: the nearer of the two).")] = 2
    upscaler_1: Annotated[str, Meta(description="An upscaler model's name, or None/Lanczos for the configured one.")] | None = None


class SdExtraSingleImageResponse(Struct, kw_only=True):
    image: str
    html_info: str = ""
