"""Generation parameters inside result files, in AUTOMATIC1111's "infotext" format.

A1111 (and civitai, InvokeAI's importer, most "PNG Info" readers) store one text::

    a red fox in the snow <lora:style:0.8>
    Negative prompt: blurry
    Steps: 20, CFG scale: 5, Seed: 42, Size: 1024x1024, Model: sdxl

PNG files carry it as the ``parameters`` text chunk; JPEG and WEBP as EXIF
UserComment (tag 0x9286) with the 8-byte ``UNICODE\\0`` charset header and UTF-16BE
text, as A1111 writes it with piexif.  LoRAs go into the prompt as
``<lora:name:scale>``, A1111's own syntax.  ``parse`` reads the text back into
``/api/generate`` fields (``POST /api/png-info``).
"""

from __future__ import annotations

import io
import json
import re
from typing import TYPE_CHECKING, Any

from .errors import BadRequest
from .samplers import SCHEDULES

if TYPE_CHECKING:
    from PIL.Image import Image

    from .items import Item
    from .jobs import JobRecord

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE = b"UNICODE\0"
ASCII = b"ASCII\0\0\0"
NEGATIVE = "Negative prompt:"
# A1111's infotext_utils.re_param: "Key: value" pairs, a value quoted as JSON when it holds , : or a newline
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?[^>]*>")


def quote(value: str) -> str:
    """A1111's ``quote``: JSON-quoted when the value would break the key: value list."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _number(value: float) -> str:
    return f"{value:g}"


def build(job: JobRecord, item: Item, seed: int) -> str:
    """The infotext of one image of ``item`` (image k of an item has seed item.seed + k)."""
    prompt = item.prompt
    tags = " ".join(f"<lora:{lr.name}:{_number(lr.scale)}>" for lr in item.loras)
    if tags:
        prompt = f"{prompt} {tags}" if prompt else tags
    params: dict[str, str] = {"Steps": str(item.steps)}
    if item.sampler:  # as A1111 writes them: the sampler, and the schedule it ran
        params["Sampler"] = item.sampler
        params["Schedule type"] = SCHEDULES[item.scheduler].label if item.scheduler in SCHEDULES else "Automatic"
    if item.guidance is not None:
        params["CFG scale"] = _number(item.guidance)
    params["Seed"] = str(seed)
    params["Size"] = f"{item.width}x{item.height}"
    params["Model"] = job.model
    if item.strength is not None and job.task == "edit":
        params["Denoising strength"] = _number(item.strength)
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items())
    negative = f"\n{NEGATIVE} {item.negative_prompt}" if item.negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def sections(text: str) -> tuple[str, str | None, dict[str, str]]:
    """Infotext -> (prompt as written, negative prompt or None, the "Key: value" pairs of
    its last line), as A1111's ``parse_generation_parameters`` splits it."""
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:  # A1111's rule: no parameter line
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in lines:
        if line.startswith(NEGATIVE):
            target = negative
            line = line[len(NEGATIVE):].strip()
        target.append(line)
    params: dict[str, str] = {}
    for key, value in PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        params[key.strip()] = value.strip() if isinstance(value, str) else str(value)
    return "\n".join(prompt), "\n".join(negative) if negative else None, params


def split_loras(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """A1111's ``<lora:NAME:SCALE>`` tags out of a prompt: (the prompt without them,
    ``[{name, scale}]``; a missing or unreadable scale is 1)."""
    loras: list[dict[str, Any]] = []
    for m in LORA_TAG.finditer(prompt):
        try:
            scale = float(m[2]) if m[2] else 1.0
        except ValueError:
            scale = 1.0
        loras.append({"name": m[1], "scale": scale})
    return re.sub(r"[ \t]*,?[ \t]*$", "", LORA_TAG.sub("", prompt)).strip(), loras


def parse(text: str) -> dict[str, Any]:
    """Infotext -> generate fields (``prompt``, ``negative_prompt``, ``steps``,
    ``guidance``, ``seed``, ``width``, ``height``, ``model``, ``loras``, ``strength``);
    a field the text does not have is absent."""
    joined, negative, params = sections(text)
    prompt, loras = split_loras(joined)
    out: dict[str, Any] = {"prompt": prompt}
    if negative is not None:
        out["negative_prompt"] = negative
    if loras:
        out["loras"] = loras
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int),
                            ("Denoising strength", "strength", float)):  # fmt: skip
        if key in params:
            try:
                out[name] = kind(params[key])
            except ValueError:
                pass
    if (size := SIZE.match(params.get("Size", ""))) is not None:
        out["width"], out["height"] = int(size[1]), int(size[2])
    if params.get("Model"):
        out["model"] = params["Model"]
    for key, name in (("Sampler", "sampler"), ("Schedule type", "scheduler")):
        if params.get(key):
            out[name] = params[key]
    return out


def exif_with(text: str) -> bytes:
    """EXIF bytes holding ``text`` as UserComment (JPEG, WEBP)."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE + text.encode("utf-16-be")
    return exif.tobytes()


def user_comment(raw: bytes) -> str | None:
    """EXIF UserComment bytes -> text (UNICODE: UTF-16, big-endian as A1111 writes it)."""
    head, body = raw[:8], raw[8:]
    if head == UNICODE:
        # some writers use little-endian: ASCII text then has its zero bytes second
        le = len(body) >= 2 and body[0] != 0 and body[1] == 0
        return body.decode("utf-16-le" if le else "utf-16-be", errors="replace").rstrip("\0") or None
    if head == ASCII or head == b"\0" * 8:
        return body.decode("latin-1").rstrip("\0") or None
    return raw.decode("utf-8", errors="replace").rstrip("\0") or None


def read(image: Image) -> str | None:
    """The infotext an opened image carries: a PNG ``parameters`` chunk, else EXIF UserComment."""
    text = image.info.get("parameters")
    if isinstance(text, str) and text.strip():
        return text
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(raw, bytes):
        return user_comment(raw)
    if isinstance(raw, str):
        return raw or None
    return None


def read_bytes(data: bytes, param: str, max_pixels: int) -> str | None:
    """The infotext of an image file's bytes (None: it has none); 400 for what is no image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise BadRequest(
                    f"{param}: the image is {img.width}x{img.height}, over the limit of {max_pixels} pixels", param=param
                )
            img.load()  # text chunks after the image data are read with it
            return read(img)
    except BadRequest:
        raise
    except Exception as exc:  # Pillow raises many kinds on a broken file: all mean "not an image"
        raise BadRequest(
            f"{param}: could not read the image ({type(exc).__name__}); send a PNG, JPEG or WEBP file", param=param
        ) from None
