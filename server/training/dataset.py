"""Training datasets: a folder of images, each with a same-named ``.txt`` caption.

``validate_dataset`` runs before a job is queued: the folder must lie inside one of
``training.dataset_roots`` once ``..`` and symlinks are resolved (each file too),
and every image must have a non-empty caption and decode with PIL.  Refusals name
the offending files.  ``training_size`` and ``prepare_image`` give each image its
training size: the aspect ratio kept at about ``resolution²`` pixels, center-cropped
to multiples of 16.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..backends.inputs import fit_image
from ..errors import BadRequest, Forbidden
from .plan import Sample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MULTIPLE = 16
MAX_NAMED = 10  # files named in one refusal



def _names(paths: list[Path], root: Path) -> str:
    shown = ", ".join(str(p.relative_to(root)) for p in paths[:MAX_NAMED])
    return shown + (f" and {len(paths) - MAX_NAMED} more" if len(paths) > MAX_NAMED else "")


def resolve_dataset_dir(dataset_dir: str, roots: list[str]) -> Path:
    """The real folder ``dataset_dir`` names, refused unless it is inside a root.

    A relative path is taken relative to the first root that holds it.
    """
    if not roots:
        raise Forbidden(
            "training is disabled: training.dataset_roots is empty; add the folders that hold training datasets to the settings",
            param="dataset_dir",
        )
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    given = Path(dataset_dir).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in real_roots]
    for candidate in candidates:
        path = candidate.resolve()  # follows symlinks and removes ..
        if not any(path.is_relative_to(root) for root in real_roots):
            raise Forbidden(
                f"dataset_dir {dataset_dir!r} resolves to {path}, which is outside training.dataset_roots "
                f"({', '.join(map(str, real_roots))}); put the dataset inside one of them",
                param="dataset_dir",
            )
        if path.is_dir():
            return path
    raise BadRequest(
        f"dataset_dir {dataset_dir!r} is not a folder inside training.dataset_roots; check the path",
        param="dataset_dir",
    )


def validate_dataset(dataset_dir: str, roots: list[str]) -> tuple[Path, list[Sample]]:
    """Check the whole dataset (runs in a thread: it decodes every image)."""
    folder = resolve_dataset_dir(dataset_dir, roots)
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise BadRequest(
            f"dataset_dir {dataset_dir!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images with a .txt caption each",
            param="dataset_dir",
        )
    escaping = [p for p in images if not any(p.resolve().is_relative_to(r) for r in real_roots)]
    if escaping:
        raise Forbidden(
            f"these images are links to files outside training.dataset_roots: {_names(escaping, folder)}; "
            "copy the files into the dataset instead",
            param="dataset_dir",
        )
    uncaptioned = [p for p in images if not p.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise BadRequest(
            f"these images have no caption file: {_names(uncaptioned, folder)}; add a .txt file with the "
            "same name beside each (e.g. cat.png -> cat.txt)",
            param="dataset_dir",
        )
    samples = [Sample(image=str(p), caption=p.with_suffix(".txt").read_text(errors="replace").strip()) for p in images]
    empty = [Path(s.image).with_suffix(".txt") for s in samples if not s.caption]
    if empty:
        raise BadRequest(f"these caption files are empty: {_names(empty, folder)}; describe each image", param="dataset_dir")
    unreadable = [p for p in images if not _readable(p)]
    if unreadable:
        raise BadRequest(
            f"these images cannot be read: {_names(unreadable, folder)}; replace or remove them (PNG, JPEG, WEBP or BMP)",
            param="dataset_dir",
        )
    return folder, samples


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False
    return True


def training_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """About ``resolution²`` pixels with the image's aspect ratio, each side a
    multiple of 16 (and at least 16)."""
    scale = resolution / math.sqrt(width * height)
    return (
        max(MULTIPLE, int(width * scale) // MULTIPLE * MULTIPLE),
        max(MULTIPLE, int(height * scale) // MULTIPLE * MULTIPLE),
    )


def prepare_image(path: str | Path, resolution: int) -> Image.Image:
    """Aspect-preserving resize and center crop to the training size."""
    with Image.open(path) as img:
        img.load()
        return fit_image(img, *training_size(img.width, img.height, resolution))
