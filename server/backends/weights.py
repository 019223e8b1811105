"""Where a Diffusers model's weights come from and how they load: the device and dtype
``auto`` resolves to, a local folder or a Hugging Face repo id, and the weight variant
(``fp16``/``bf16``) a folder holds."""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from .base import BackendError
from .lora import WEIGHT_SUFFIXES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_device(spec: str) -> str:
    """``auto`` -> cuda when available, else mps, else cpu; anything else verbatim."""
    if spec != "auto":
        return spec
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(spec: str, device: str, float16: bool = True) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float16 on MPS (bfloat16 for a family that
    overflows float16: ``float16`` False), float32 on CPU."""
    if spec != "auto":
        return DTYPES[spec]
    if device.startswith("cuda"):
        return torch.bfloat16
    if device.startswith("mps"):
        return torch.float16 if float16 else torch.bfloat16
    return torch.float32


def device_map(setting: str, device: str, offload: str) -> str | None:
    """The ``device_map`` a pipeline's ``from_pretrained`` gets (``models.NAME.device_map``):
    ``"cuda"`` puts each component's weights on the GPU as they are read (no copy in
    host memory first, no ``.to()`` over every tensor: faster loads, which
    ``load_on_demand`` pays per job), None loads into host memory.  Diffusers 0.42
    takes ``"balanced"``, ``"cpu"`` or the accelerator's type (``"cuda"``: the current
    device, so ``cuda:0`` here; another index loads through host memory); offload needs
    the components in host memory, so it never uses one."""
    cuda = device in ("cuda", "cuda:0")
    if setting == "off" or offload != "none" or (setting == "auto" and not cuda):
        return None
    if not cuda:
        raise BackendError(
            f"device_map 'device' loads straight onto the GPU 'cuda' (cuda:0), but this model runs on {device!r}; "
            "use device_map 'auto'"
        )
    return "cuda"


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_TOKEN") or None


def resolve_source(path: str | None, key: str, model: str) -> tuple[str, dict[str, Any]]:
    """A local path, or a Hugging Face repo id (``org/name`` that does not exist on
    disk), with the keyword arguments ``from_pretrained`` needs for it."""
    if not path:
        raise BackendError(f"model {model!r} has no {key} configured; set it to a local Diffusers folder")
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        variant = weights_variant(expanded)
        return expanded, ({"variant": variant} if variant else {})
    if REPO_ID.match(path):
        return path, {"token": hub_token()}
    raise BackendError(
        f"{key} {path!r} of model {model!r} does not exist; download the weights there "
        f"(e.g. `hf download ORG/NAME --local-dir {path}`) or fix the path in the settings"
    )


VARIANTS = ("fp16", "bf16")


def weights_variant(folder: str) -> str | None:
    """The variant to load a pipeline folder with: ``fp16`` (or ``bf16``) when some
    component has only weight files of that variant (e.g. ``unet/diffusion_pytorch_model.fp16.safetensors``,
    as ``hf download --include "*.fp16.*"`` leaves it), which ``from_pretrained``
    does not find without ``variant=``; components that have plain weights still
    load them. None when every component has plain weights."""
    found: set[str] = set()
    try:
        components = [e for e in os.scandir(folder) if e.is_dir()]
    except OSError:
        return None
    for component in components:
        try:
            names = [n for n in os.listdir(component.path) if n.endswith(WEIGHT_SUFFIXES)]
        except OSError:
            continue
        tags = {_variant_tag(n) for n in names}
        if len(tags) == 1 and None not in tags:  # weights, all of one variant
            found |= tags  # type: ignore[arg-type]
    return found.pop() if len(found) == 1 else None


def _variant_tag(name: str) -> str | None:
    """``fp16`` for model.fp16.safetensors, model.fp16-00001-of-00002.safetensors or
    diffusion_pytorch_model-00001-of-00002.fp16.safetensors; None for plain weights."""
    parts = set(re.split(r"[.-]", name))
    return next((v for v in VARIANTS if v in parts), None)
