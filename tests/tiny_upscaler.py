"""Tiny random-weight Real-ESRGAN checkpoints for tests and benchmarks (offline).

``write_tiny_esrgan(path)`` saves an RRDBNet (16 filters, 2 blocks, x4: 2.3 MB) as
Real-ESRGAN releases do: ``{"params_ema": state_dict}`` with basicsr key names
(``conv_first``, ``body.0.rdb1.conv1``, ``conv_body``, ``conv_up1``...).  With
``layout="esrgan"`` the original ESRGAN key names are kept (``model.0``...); that
layout also works for x2/x8 models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from spandrel.architectures.ESRGAN import ESRGAN

# old ESRGAN sequential index -> basicsr RRDBNet name, for a x4 model
_X4_NAMES = {
    "model.0.": "conv_first.",
    "model.3.": "conv_up1.",
    "model.6.": "conv_up2.",
    "model.8.": "conv_hr.",
    "model.10.": "conv_last.",
}


def _basicsr_key(key: str, num_blocks: int) -> str:
    if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", key):
        return f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
    if key.startswith(f"model.1.sub.{num_blocks}."):
        return "conv_body." + key.rsplit(".", 1)[1]
    for old, new in _X4_NAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(key)


def write_tiny_esrgan(
    path: Path,
    *,
    scale: int = 4,
    num_filters: int = 16,
    num_blocks: int = 2,
    seed: int = 0,
    layout: Literal["realesrgan", "esrgan"] = "realesrgan",
) -> Path:
    torch.manual_seed(seed)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=num_filters, num_blocks=num_blocks, scale=scale)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "realesrgan":
        if scale != 4:
            raise ValueError("the basicsr layout helper covers x4 models; use layout='esrgan' for other scales")
        state = {_basicsr_key(k, num_blocks): v for k, v in state.items()}
    torch.save({"params_ema": state}, path)
    return path
