"""Backends by config key.  Modules are imported on first use so that a server with
only the stub backend starts without importing torch or Diffusers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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


def create_backend(name: str, cfg: ModelConfig, settings: Settings, *, isolate: bool | None = None) -> Backend:
    """Instantiate (not load) the backend for model ``name``; with ``cfg.isolate``
    (or ``isolate=True``) a proxy that runs it in a child process."""
    if cfg.isolate if isolate is None else isolate:
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
