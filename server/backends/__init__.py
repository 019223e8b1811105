"""Backends by family (server/families.py).  Modules are imported on first use so
that a server with only the stub backend starts without importing torch or Diffusers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..families import FAMILIES

if TYPE_CHECKING:
    from ..config import ModelConfig, Settings
    from .base import Backend

def create_backend(name: str, cfg: ModelConfig, settings: Settings) -> Backend:
    """Instantiate (not load) the backend for model ``name`` in this process (the model
    host puts it in a process of its own where ``runs_isolated(cfg)``)."""
    return backend_class(cfg)(name, cfg, settings)  # type: ignore[no-any-return]


def backend_class(cfg: ModelConfig) -> Any:
    """The class of ``cfg``'s family (its module imported now)."""
    module_name, _, cls_name = FAMILIES[cfg.backend].implementation.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), cls_name)
