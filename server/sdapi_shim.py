"""A1111's ``/sdapi/v1`` translated: A1111 requests -> ``GenerateRequest`` (then the
ordinary ``build_job``), finished jobs -> A1111's ``{images, parameters, info}``,
and the listings A1111 clients read before they generate.

Routes live in ``routes/sdapi.py``; this module knows nothing about HTTP.

Samplers: A1111's ``sampler_name`` (else ``sampler_index``) and ``scheduler`` run as
the Diffusers scheduler ``server/samplers.py`` maps them to, where the model's family
runs it; a name it does not run is accepted, listed in ``info.ignored``, and the model
runs its own scheduler (``info.sampler_honoured: false``): never a 422."""

from __future__ import annotations

import hashlib
import io
import json
import time
from typing import TYPE_CHECKING, Any

import msgspec
from PIL import Image

from . import infotext
from .auth import OPEN
from .build import decode_b64, parse_seed
from .errors import BadRequest
from .families import UPSCALERS
from .items import Item
from .jobs import JobRecord, JobStatus
from .routes.common import decode
from .samplers import AUTOMATIC, SCHEDULES, Choice, Unsupported, choose
from .samplers import samplers as sampler_table
from .samplers import schedules as schedule_table
from .schemas import GenerateRequest
from .schemas_sdapi import SdImg2ImgRequest, SdModel, SdNamed, SdTxt2ImgRequest
from .version import __version__

if TYPE_CHECKING:
    from .auth import Caller
    from .registry import ModelState
    from .service import Service

UNSET: tuple[Any, ...] = (None, "", [], {}, False, 0, -1, "None")  # values that ask for nothing
SELECTION = "sdapi:model:{owner}"  # blob key: the model a key picked with POST /options


def decode_object(body: bytes) -> dict[str, Any]:
    """A JSON object body (A1111 clients send every field, known or not)."""
    if not body.strip():
        return {}
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def ignored(body: dict[str, Any], typ: type[SdTxt2ImgRequest]) -> list[str]:
    """The fields of ``body`` that asked for something easel does not do: every field
    the request type does not declare (a sampler the model does not run: ``sampling``)."""
    honoured = set(typ.__struct_fields__)
    out = [k for k, v in body.items() if k not in honoured and not _unset(v)]
    out += [f"override_settings.{k}" for k, v in (body.get("override_settings") or {}).items()
            if k != "sd_model_checkpoint" and not _unset(v)]  # fmt: skip
    return sorted(out)


def _unset(value: Any) -> bool:
    return any(value == u and type(value) is type(u) for u in UNSET) or (isinstance(value, int | float) and value in (0, -1))


def model_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def sd_model(ms: ModelState) -> SdModel:
    digest = model_hash(ms.name)
    return SdModel(title=ms.name, model_name=ms.name, hash=digest[:10], sha256=digest,
                   filename=ms.cfg.transformer_path or ms.cfg.model_path or ms.name)  # fmt: skip


def image_models(service: Service, caller: Caller = OPEN) -> list[ModelState]:
    """The models A1111 clients may pick: those that generate or edit (and ``caller``'s
    allow-list lets it use)."""
    return [ms for ms in service.models(caller) if ms.cfg.backend not in UPSCALERS and {"generate", "edit"} & set(ms.capabilities.tasks)]


def find_checkpoint(service: Service, title: str) -> ModelState:
    """A checkpoint title as A1111 clients send it back: easel's model name, optionally
    with a file suffix or A1111's `` [hash]`` tail."""
    name = title.strip()
    if name.endswith("]") and " [" in name:
        name = name[: name.rindex(" [")]
    candidates = {ms.name: ms for ms in image_models(service)}
    for key in (name, name.rsplit(".", 1)[0]):
        if key in candidates:
            return candidates[key]
    raise BadRequest(
        f"sd_model_checkpoint {title!r} is not a model here; pick a title from GET /sdapi/v1/sd-models "
        f"({', '.join(candidates) or 'none'})",
        param="sd_model_checkpoint",
    )


async def selected_model(service: Service, caller: Caller) -> str | None:
    """The model this key picked with POST /sdapi/v1/options (None: the default)."""
    data = await service.broker.get_blob(SELECTION.format(owner=caller.key_id or "-"))
    return data.decode() if data else None


async def select_model(service: Service, caller: Caller, name: str) -> None:
    """Kept for ``queue.result_ttl_seconds`` (on Redis) and renewed by each job."""
    await service.broker.put_blob(SELECTION.format(owner=caller.key_id or "-"), name.encode())


async def model_for(service: Service, caller: Caller, req: SdTxt2ImgRequest) -> str | None:
    """override_settings.sd_model_checkpoint, else the key's pick, else the default."""
    title = (req.override_settings or {}).get("sd_model_checkpoint")
    if isinstance(title, str) and title:
        return find_checkpoint(service, title).name
    name = await selected_model(service, caller)
    if name is not None:
        await select_model(service, caller, name)  # renew
    return name


def sampling(req: SdTxt2ImgRequest, backend: str) -> tuple[dict[str, str], list[str]]:
    """(GenerateRequest's sampler / scheduler, the A1111 fields not honoured): as A1111,
    ``sampler_name`` else ``sampler_index``; a sampler or schedule the model's family
    does not run is dropped (the model runs its own scheduler), never refused."""
    name = req.sampler_name or req.sampler_index
    given = "sampler_name" if req.sampler_name else "sampler_index"
    schedule = req.scheduler if req.scheduler and req.scheduler.casefold() != AUTOMATIC else None
    try:
        return _fields(choose(backend, name, schedule)), []
    except Unsupported as exc:
        if exc.param == "scheduler" and name:
            try:  # the sampler on its own schedule
                return _fields(choose(backend, name, None)), ["scheduler"]
            except Unsupported:
                pass
        return {}, sorted(k for k, v in ((given, name), ("scheduler", schedule)) if v)


def _fields(choice: Choice) -> dict[str, str]:
    sampler, schedule = choice.stored
    return {k: v for k, v in (("sampler", sampler), ("scheduler", schedule)) if v}


def generate_fields(req: SdTxt2ImgRequest, ms: ModelState) -> dict[str, Any]:
    """The GenerateRequest fields of a txt2img request (img2img adds its own)."""
    if req.batch_size > ms.capabilities.max_output_images:
        raise BadRequest(f"batch_size {req.batch_size} is over model {ms.name!r}'s max_output_images of "
                         f"{ms.capabilities.max_output_images}; use a smaller batch_size and more n_iter", param="batch_size")  # fmt: skip
    prompt, loras = infotext.split_loras(req.prompt)
    fields: dict[str, Any] = {"model": ms.name, "n": req.batch_size, "seed": parse_seed(None if req.seed < 0 else req.seed),
                              "format": "PNG", "priority": req.priority}  # fmt: skip
    if req.n_iter > 1:
        fields["prompts"] = [prompt] * req.n_iter  # seeds run s, s+1, ... over the whole batch, as in A1111
    else:
        fields["prompt"] = prompt
    if loras:
        fields["loras"] = loras
    fields.update(sampling(req, ms.cfg.backend)[0])
    for name, value in (("negative_prompt", req.negative_prompt or None), ("steps", req.steps), ("guidance", req.cfg_scale),
                        ("width", req.width), ("height", req.height)):  # fmt: skip
        if value is not None:
            fields[name] = value
    return fields


def txt2img_request(req: SdTxt2ImgRequest, ms: ModelState) -> GenerateRequest:
    return decode(generate_fields(req, ms), GenerateRequest)


def img2img_request(req: SdImg2ImgRequest, ms: ModelState) -> tuple[str, GenerateRequest]:
    """(task, request): with a mask an edit of init_images[0]; without, img2img
    (``init_image``) where the model generates, else an edit of every init image."""
    if not req.init_images:
        raise BadRequest("img2img needs init_images: [base64 image]", param="init_images")
    for i, image in enumerate(req.init_images):
        image_size(image, f"init_images[{i}]")  # a 400 that names A1111's field
    fields = generate_fields(req, ms)
    strength = req.denoising_strength if req.denoising_strength is not None else 0.75
    fields["strength"] = strength
    if req.mask is not None:
        fields["images"] = req.init_images[:1]
        fields.pop("width", None), fields.pop("height", None)  # the result has the image's size
        if req.mask_blur is not None:
            fields["mask_blur"] = req.mask_blur
        return "edit", decode(fields, GenerateRequest)
    if "generate" in ms.capabilities.tasks and ms.capabilities.supports_init_image:
        fields["init_image"] = req.init_images[0]
        return "generate", decode(fields, GenerateRequest)
    fields["images"] = req.init_images
    return "edit", decode(fields, GenerateRequest)


def a1111_mask(data: str, size: tuple[int, int], invert: bool, max_pixels: int) -> bytes:
    """A1111's mask (white = repaint; an RGBA mask with transparency: its alpha over
    128) -> easel's convention (L, white = repaint) at the image's size, as PNG."""
    try:
        img = Image.open(io.BytesIO(decode_b64(data, "mask")))
        if img.width * img.height > max_pixels:
            raise BadRequest(f"mask: {img.width}x{img.height} is over the limit of {max_pixels} pixels", param="mask")
        img.load()
    except BadRequest:
        raise
    except Exception as exc:  # Pillow raises many kinds on a broken file
        raise BadRequest(f"mask: could not read the image ({type(exc).__name__}); send a PNG", param="mask") from None
    alpha = img.getchannel("A") if img.mode == "RGBA" else None
    if alpha is not None and alpha.getextrema()[0] != 255:  # type: ignore[comparison-overlap]
        mask = alpha.point(lambda v: 255 if v > 128 else 0)
    else:
        mask = img.convert("L")
    if invert:
        mask = mask.point(lambda v: 255 - v)
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    mask.save(out, "PNG")
    return out.getvalue()


def image_size(data: str, param: str) -> tuple[int, int]:
    raw = decode_b64(data, param)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return img.size
    except Exception as exc:
        raise BadRequest(f"{param}: could not read the image ({type(exc).__name__}); send PNG, JPEG or WEBP base64", param=param) from None


def per_image(job: JobRecord) -> list[tuple[Item, int]]:
    """(item, seed) of every image the job makes, in result order."""
    return [(item, item.seed + k) for item in job.items for k in range(item.n)]


def info(job: JobRecord, req: SdTxt2ImgRequest, ignored_fields: list[str]) -> str:
    """A1111's ``info`` JSON string for a finished job (images as far as it got)."""
    images = per_image(job)
    made = [images[r.index] for r in job.results if r.index < len(images)]
    first = job.items[0]
    seeds = [seed for _, seed in images]
    out: dict[str, Any] = {
        "prompt": first.prompt, "all_prompts": [it.prompt for it, _ in images],
        "negative_prompt": first.negative_prompt or "", "all_negative_prompts": [it.negative_prompt or "" for it, _ in images],
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": first.width, "height": first.height, "sampler_name": first.sampler or req.sampler_name or req.sampler_index,
        "scheduler": (SCHEDULES[first.scheduler].label if first.scheduler else "Automatic") if first.sampler else req.scheduler,
        "cfg_scale": first.guidance, "steps": first.steps, "batch_size": first.n, "n_iter": len(job.items),
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": job.model,
        "sd_model_hash": model_hash(job.model)[:10], "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": first.strength,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [infotext.build(job, it, seed) for it, seed in made], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(job.created_at)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"easel {__version__}",
        # easel's own
        "task_id": job.id, "ignored": ignored_fields, "sampler_honoured": first.sampler is not None,
        "scheduler_honoured": first.sampler is not None and "scheduler" not in ignored_fields,
        "interrupted": job.status is JobStatus.CANCELLED, "message": job.message,
    }  # fmt: skip
    return json.dumps(out)


def samplers(backend: str) -> list[SdNamed]:
    """The samplers a model of ``backend`` runs, as A1111 lists its own."""
    return [SdNamed(name=s.name, label=s.name, aliases=list(s.aliases),
                    options={"scheduler": s.default} if s.default else {}) for s in sampler_table(backend)]  # fmt: skip


def schedulers(backend: str) -> list[SdNamed]:
    return [SdNamed(name=s.name, label=s.label, aliases=list(s.aliases)) for s in schedule_table(backend)]


def png_parameters(text: str) -> dict[str, Any]:
    """An infotext as A1111's ``parse_generation_parameters`` answers it."""
    prompt, negative, params = infotext.sections(text)
    out: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative or "", **params}
    if (size := infotext.SIZE.match(params.get("Size", ""))) is not None:
        out["Size-1"], out["Size-2"] = size[1], size[2]
    return out
