"""Backends by family (server/families.py).  Modules are imported on first use so
that a server with only the stub backend starts without importing torch or Diffusers."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ..families import FAMILIES
from .base import BackendError

if TYPE_CHECKING:
    from ..config import ModelConfig, Settings
    from .base import Backend

def missing_extra(cfg: ModelConfig) -> str | None:
    """The first package its family needs (``Family.needs``: easel's [diffusers] extra)
    that this install lacks; None when all are there (or the stub)."""
    return next((m for m in FAMILIES[cfg.backend].needs if not _importable(m)), None)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_extra(name: str, cfg: ModelConfig) -> None:
    """One clean line when the model's family needs packages this install lacks."""
    if (missing := missing_extra(cfg)) is not None:
        raise BackendError(
            f"model {name!r} (backend {cfg.backend}) needs easel's Diffusers extra, which is not installed "
            f"(no module {missing!r}): pip install 'easel[diffusers]' (in a checkout: pip install '.[diffusers]' "
            "or -r requirements.txt)"
        )


def create_backend(name: str, cfg: ModelConfig, settings: Settings) -> Backend:
    """Instantiate (not load) the backend for model ``name`` in this process (the model
    host puts it in a process of its own where ``runs_isolated(cfg)``)."""
    check_extra(name, cfg)
    return backend_class(cfg)(name, cfg, settings)  # type: ignore[no-any-return]


def backend_class(cfg: ModelConfig) -> Any:
    """The class of ``cfg``'s family (its module imported now)."""
    module_name, _, cls_name = FAMILIES[cfg.backend].implementation.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), cls_name)
