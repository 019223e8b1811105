"""Encoding a job's images: PNG / JPEG / WEBP bytes, with the job's parameters
embedded (an A1111 infotext, server/infotext.py), on a thread after the job has
left the model."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from .. import infotext
from ..jobs import PENDING, ImageResult, JobRecord, result_key

if TYPE_CHECKING:
    from PIL.Image import Image


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
