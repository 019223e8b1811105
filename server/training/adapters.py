"""LoRA adapters on disk: each in ``lora_dir/<name>/`` as the pipeline class's
``save_lora_weights`` writes it (``pytorch_lora_weights.safetensors``) beside
``easel_lora.json`` (base model, steps done, rank, dataset, final loss...).

Checkpoints are written to a scratch folder and moved into place file by file, so
a reader (a generate job using the adapter) never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..backends.lora import DEFAULT_WEIGHT_NAME, WEIGHT_SUFFIXES

METADATA_NAME = "easel_lora.json"


def adapter_dir(lora_dir: str, name: str) -> Path:
    return Path(lora_dir).expanduser().resolve() / name


def has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir())


def read_metadata(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / METADATA_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def list_adapters(lora_dir: str) -> list[tuple[str, Path, dict[str, Any] | None]]:
    """(name, weight file, metadata) of every adapter in ``lora_dir``: folders
    holding weights, and weight files directly inside it."""
    root = Path(lora_dir).expanduser().resolve()
    if not root.is_dir():
        return []
    out: list[tuple[str, Path, dict[str, Any] | None]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix in WEIGHT_SUFFIXES:
            out.append((entry.stem, entry, None))
        elif has_weights(entry):
            weights = entry / DEFAULT_WEIGHT_NAME
            if not weights.is_file():
                weights = next(p for p in sorted(entry.iterdir()) if p.suffix in WEIGHT_SUFFIXES)
            out.append((entry.name, weights, read_metadata(entry)))
    return out


def save_checkpoint(
    pipe_cls: Any,
    layers: dict[str, Any],
    adapter_config: dict[str, Any],
    folder: Path,
    metadata: dict[str, Any],
) -> Path:
    """Write the adapter weights and metadata into ``folder``; returns the weight file."""
    scratch = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        pipe_cls.save_lora_weights(
            scratch,
            transformer_lora_layers=layers,
            safe_serialization=True,
            transformer_lora_adapter_metadata=adapter_config,
        )
        (scratch / METADATA_NAME).write_text(json.dumps(metadata, indent=2, default=str))
        folder.mkdir(parents=True, exist_ok=True)
        for item in sorted(scratch.iterdir(), key=lambda p: p.name == METADATA_NAME):
            os.replace(item, folder / item.name)  # weights first, metadata last
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder / DEFAULT_WEIGHT_NAME
