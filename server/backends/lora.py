"""Per-request LoRA adapters for Diffusers pipelines.

``applied_loras`` resolves each requested name inside the model's ``lora_dir``
(names escaping it are refused), loads the adapters, sets their scales, and removes
them again when the job ends, so the next job runs with base weights.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import BackendError, LoraSpec

if TYPE_CHECKING:
    from collections.abc import Iterator

WEIGHT_SUFFIXES = (".safetensors", ".bin")
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def resolve_lora(name: str, lora_dir: str | None, model: str) -> Path:
    """The weight file for LoRA ``name``: ``lora_dir/name`` as a file, as
    ``name.safetensors``, or a folder holding one weight file (as written by training
    or ``save_lora_weights``).  Checked at submit (``build.build_job``) and again
    when the job runs."""
    if not lora_dir:
        raise BackendError(f"model {model!r} has no lora_dir configured, so it cannot use LoRA {name!r}")
    if not is_plain_name(name):
        raise BackendError(
            f"LoRA name {name!r} is not a name inside the model's lora_dir; "
            "use an adapter's plain name (a file or folder name there, without any path)"
        )
    try:
        return _find_weights(name, Path(lora_dir).expanduser().resolve(), lora_dir, model)
    except (OSError, ValueError) as exc:  # e.g. a name too long for the file system
        raise BackendError(f"LoRA {name!r} cannot be read in {lora_dir} for model {model!r} ({exc})") from None


def is_plain_name(name: str) -> bool:
    """A file or folder name: no path separators, not '.' or '..', no NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _find_weights(name: str, root: Path, lora_dir: str, model: str) -> Path:
    target = (root / name).resolve()
    if target == root or not target.is_relative_to(root):  # a link out of lora_dir
        raise BackendError(f"LoRA name {name!r} is not a name inside the model's lora_dir; use a plain name")
    candidates = [target, target.with_name(target.name + ".safetensors")]
    for path in candidates:
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            return path
    if target.is_dir():
        if (target / DEFAULT_WEIGHT_NAME).is_file():
            return target / DEFAULT_WEIGHT_NAME
        files = sorted(p for p in target.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if len(files) == 1:
            return files[0]
        raise BackendError(
            f"LoRA folder {name!r} holds {len(files)} weight files; it must hold exactly one (or {DEFAULT_WEIGHT_NAME})"
        )
    available = sorted(p.stem for p in root.iterdir()) if root.is_dir() else []
    raise BackendError(
        f"LoRA {name!r} not found in {lora_dir} for model {model!r}"
        + (f" (available: {', '.join(available[:20])})" if available else " (the folder is empty or missing)")
    )


def adapter_name(index: int, name: str) -> str:
    return f"easel{index}_" + re.sub(r"\W", "_", name)[:40]


def load_loras(pipe: Any, specs: list[LoraSpec], lora_dir: str | None, model: str) -> list[str]:
    """Load and activate ``specs``; returns the adapter names (for ``remove_loras``)."""
    names: list[str] = []
    try:
        for k, spec in enumerate(specs):
            path = resolve_lora(spec.name, lora_dir, model)
            adapter = adapter_name(k, spec.name)
            try:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
            except Exception as exc:  # peft/diffusers raise many types for bad files
                raise BackendError(
                    f"LoRA {spec.name!r} could not be applied to model {model!r}: {exc}. "
                    "Check that it was trained for this model family"
                ) from exc
            if adapter not in {a for group in pipe.get_list_adapters().values() for a in group}:
                raise BackendError(
                    f"LoRA {spec.name!r} has no weights matching model {model!r}; "
                    "it was probably trained for another model family"
                )
            names.append(adapter)
        pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
    except BaseException:
        remove_loras(pipe, names)
        raise
    return names


def remove_loras(pipe: Any, names: list[str]) -> None:
    if names:
        pipe.delete_adapters(names)


@contextmanager
def applied_loras(pipe: Any, specs: list[LoraSpec], lora_dir: str | None, model: str) -> Iterator[None]:
    if not specs:
        yield
        return
    names = load_loras(pipe, specs, lora_dir, model)
    try:
        yield
    finally:
        remove_loras(pipe, names)
