"""Backends by config key.  Modules are imported on first use so that a server with
only the stub backend starts without importing torch or Diffusers."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from .base import BackendError

if TYPE_CHECKING:
    from ..config import ModelConfig, Settings
    from .base import Backend

# config key -> "module:Class"
BACKENDS: dict[str, str] = {
    "stub": "stub:StubBackend",
    "flux2_klein": "flux2_klein:Flux2KleinBackend",
    "sdxl": "sdxl:SDXLBackend",
    "z_image": "z_image:ZImageBackend",
    "qwen_edit_gguf": "qwen_edit_gguf:QwenEditGGUFBackend",
    "upscale_esrgan": "upscale:UpscaleBackend",
}
# backends that run in the server's process (the stub unless ``isolate: true``; an
# upscaler always: jobs call it image by image); every other one runs in a child
# process unless ``isolate: false`` (see ``runs_isolated``)
IN_PROCESS_BY_DEFAULT = frozenset({"stub", "upscale_esrgan"})
# what every backend but the stub imports: the packages of easel's [diffusers] extra
DIFFUSERS_EXTRA = ("torch", "diffusers", "transformers", "accelerate", "safetensors")
UPSCALER_NEEDS = ("torch", "spandrel", "safetensors")


def missing_extra(cfg: ModelConfig) -> str | None:
    """The first package of the [diffusers] extra the backend needs and this install
    lacks (None: all there, or the stub)."""
    if cfg.backend == "stub" or cfg.backend not in BACKENDS:
        return None
    needs = UPSCALER_NEEDS if cfg.backend == "upscale_esrgan" else DIFFUSERS_EXTRA
    return next((m for m in needs if not _importable(m)), None)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def runs_isolated(cfg: ModelConfig) -> bool:
    """Whether the model runs in its own process (``backends/isolated.py``):
    ``models.NAME.isolate``, by default every backend but the stub and the upscaler.
    A model that runs torch in the server's process shares the GIL with the event
    loop: each request the server handles meanwhile holds up the model's Python (a GPU
    pipeline waits for its next kernel launch), and unloading gives back less memory."""
    return cfg.isolate if cfg.isolate is not None else cfg.backend not in IN_PROCESS_BY_DEFAULT


def create_backend(name: str, cfg: ModelConfig, settings: Settings, *, isolate: bool | None = None) -> Backend:
    """Instantiate (not load) the backend for model ``name``; a proxy that runs it in
    a child process where ``runs_isolated(cfg)`` (or ``isolate=True``)."""
    if (missing := missing_extra(cfg)) is not None:
        raise BackendError(
            f"model {name!r} (backend {cfg.backend}) needs easel's Diffusers extra, which is not installed "
            f"(no module {missing!r}): pip install 'easel[diffusers]' (in a checkout: pip install '.[diffusers]' "
            "or -r requirements.txt)"
        )
    if runs_isolated(cfg) if isolate is None else isolate:
        from .isolated import IsolatedBackend

        return IsolatedBackend(name, cfg, settings)
    try:
        target = BACKENDS[cfg.backend]
    except KeyError:
        raise ValueError(
            f"backend {cfg.backend!r} of model {name!r} is not available in this build "
            f"(available: {', '.join(sorted(BACKENDS))})"
        ) from None
    module_name, _, cls_name = target.partition(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    cls = getattr(module, cls_name)
    return cls(name, cfg, settings)  # type: ignore[no-any-return]
