"""Wire types of the OpenAI-compatible shim (/v1/images/*).

Requests are lenient on purpose: the official SDK grows new fields faster than
easel, so unknown fields are ignored rather than refused.  Responses and stream
events mirror the shapes the ``openai`` package parses (``ImagesResponse``,
``ImageGen*Event``, ``ImageEdit*Event``).  Bytes fields encode as base64.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from msgspec import Meta, Struct

OpenAIQuality = Annotated[
    str,
    Meta(description="low, medium, high or auto: a fraction of the model's recommended_steps "
                     "(low 0.5, medium 0.75, high/auto 1.0). An explicit steps wins."),
]
OpenAISize = Annotated[
    str,
    Meta(description="WIDTHxHEIGHT (multiples of 16) or auto for the model's default size.", examples=["1024x1024"]),
]


class OpenAIImageRef(Struct, kw_only=True):
    """A reference image in a JSON edit: seed 000's {name, data_url}, or OpenAI's {image_url}."""

    name: str | None = None
    data_url: Annotated[str, Meta(description="data:image/png;base64,...")] | None = None
    image_url: Annotated[str, Meta(description="A data URL or an http(s) URL.")] | None = None
    url: str | None = None
    file_id: Annotated[str, Meta(description="Not supported: easel has no file store.")] | None = None


OpenAIImageInput = Annotated[
    Union[str, OpenAIImageRef],
    Meta(description="A data URL, bare base64, an http(s) URL, or {name, data_url} / {image_url}."),
]


class EaselKnobs(Struct, kw_only=True):
    """easel's own knobs; accepted at the top level or inside ``metadata``."""

    steps: Annotated[int, Meta(ge=1, le=10_000, description="Denoising steps; wins over quality.")] | None = None
    guidance: float | None = None
    seed: Annotated[Union[Annotated[int, Meta(ge=0, le=2**63 - 1)], str], Meta(description="Integer seed; random when absent.")] | None = None
    negative_prompt: str | None = None
    strength: Annotated[float, Meta(ge=0, le=1, description="Edit strength (img2img-style models).")] | None = None
    mask_blur: Annotated[int, Meta(ge=0, le=256, description="With mask: feather (px) inside the mask's edge; default 4.")] | None = None
    loras: Annotated[list[dict[str, Any]], Meta(description="[{name, scale}] as in /api/generate.")] | None = None
    priority: Annotated[Union[bool, Annotated[int, Meta(ge=-1_000_000, le=1_000_000)]], Meta(description="As in /api/generate: -1000000 to 1000000.")] | None = None
    deadline_seconds: Annotated[float, Meta(gt=0, description="As in /api/generate: refused (422) if it cannot be met.")] | None = None


class OpenAIImageRequest(EaselKnobs, kw_only=True):
    """POST /v1/images/generations and /v1/images/edits (JSON or multipart)."""

    prompt: str | None = None
    model: Annotated[str, Meta(description="A loaded model; the default model when absent.")] | None = None
    n: Annotated[int, Meta(ge=1, le=64)] = 1
    size: OpenAISize | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Annotated[str, Meta(description="png, jpeg or webp.")] | None = None
    output_compression: Annotated[int, Meta(ge=0, le=100, description="JPEG/WEBP quality.")] | None = None
    quality: OpenAIQuality | None = None
    background: Annotated[str, Meta(description="opaque or auto (answered opaque); transparent is refused (400): easel does not matte.")] | None = None
    input_fidelity: Annotated[Literal["low", "high"], Meta(description="Accepted; changes nothing (easel's edit models have no fidelity switch).")] | None = None
    moderation: Annotated[str, Meta(description="Accepted and ignored.")] | None = None
    user: Annotated[str, Meta(description="Accepted and ignored.")] | None = None
    stream: bool = False
    partial_images: Annotated[int, Meta(ge=0, le=3, description="Partial images streamed before the final one.")] | None = None
    images: Annotated[list[OpenAIImageInput], Meta(description="Edits: reference images.")] | None = None
    mask: OpenAIImageInput | None = None
    metadata: dict[str, Any] | None = None


class OpenAIImage(Struct, kw_only=True, omit_defaults=True):
    b64_json: bytes | None = None
    url: str | None = None
    revised_prompt: str | None = None


class InputTokensDetails(Struct, kw_only=True):
    text_tokens: int
    image_tokens: int


class OpenAIUsage(Struct, kw_only=True):
    """text_tokens: the prompt as the model's own tokenizer encodes it (on the worker;
    the stub counts words); image_tokens (each reference) and output_tokens (each
    image made): 85 + 170 per started 512x512 tile of the image."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    gpu_seconds: Annotated[float, Meta(description="easel: worker time the job used (what quotas count).")] | None = None


class OpenAIImagesResponse(Struct, kw_only=True):
    created: int
    data: list[OpenAIImage]
    output_format: str
    size: str
    quality: str
    background: str
    usage: OpenAIUsage


class PartialImageEvent(Struct, kw_only=True):
    """SSE ``image_generation.partial_image`` / ``image_edit.partial_image``."""

    type: str
    b64_json: bytes
    partial_image_index: int
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str


class CompletedEvent(Struct, kw_only=True):
    """SSE ``image_generation.completed`` / ``image_edit.completed`` (one per image)."""

    type: str
    b64_json: bytes
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str
    usage: OpenAIUsage
