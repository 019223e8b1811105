"""Loading a transformer from one file (FP8 ``.safetensors`` or ``.gguf``) with the
rest of the pipeline from a base Diffusers folder."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .base import BackendError
from .weights import resolve_source

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .diffusers_common import DiffusersBackend


def single_file_parts(cfg: ModelConfig, model: str, suffix: str) -> tuple[str, str] | None:
    """``(transformer_file, base_folder)`` when the model uses a single-file
    transformer (``transformer_path``, or ``model_path`` naming a ``suffix`` file),
    else None (a plain Diffusers folder in ``model_path``)."""
    transformer = cfg.transformer_path
    if transformer is None and cfg.model_path and cfg.model_path.endswith(suffix):
        transformer = cfg.model_path
    if transformer is None:
        return None
    transformer = os.path.expanduser(transformer)
    if not os.path.isfile(transformer):
        raise BackendError(f"transformer file {transformer!r} of model {model!r} does not exist; fix transformer_path")
    base = cfg.base_model_path or (cfg.model_path if cfg.model_path != transformer else None)
    if not base:
        raise BackendError(
            f"model {model!r} loads its transformer from {transformer!r} and needs base_model_path: the "
            "Diffusers folder (or repo id) of the matching base model for the VAE, text encoder and configs"
        )
    return transformer, base


def load_single_file_transformer(backend: DiffusersBackend, model_cls: Any, path: str, base: str, **kwargs: Any) -> Any:
    """``model_cls.from_single_file`` with the config taken from ``transformer_config_path``
    (a folder holding ``config.json``) or from ``base/transformer``."""
    cfg = backend.cfg
    if cfg.transformer_config_path:
        config, extra = resolve_source(cfg.transformer_config_path, "transformer_config_path", backend.name)
        subfolder: dict[str, str] = {}
    else:
        config, extra = resolve_source(base, "base_model_path", backend.name)
        subfolder = {"subfolder": "transformer"}
    try:
        return model_cls.from_single_file(path, config=config, dtype=backend.dtype, **subfolder, **extra, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BackendError(
            f"could not load the transformer of model {backend.name!r} from {path!r} with the config of "
            f"{config!r}: {exc}. Check that the file matches the base model"
        ) from exc
