"""Speed knobs applied to a loaded pipeline's denoiser (``models.NAME.attention_backend``
and ``compile``); each measured before its default was chosen (bench/README.md).

- ``attention_backend``: Diffusers' ``set_attention_backend`` on the transformer (or
  UNet): ``native`` (PyTorch's scaled-dot-product attention, the default), or e.g.
  ``_native_cudnn``, ``flash`` / ``_flash_3`` / ``sage`` where those packages are
  installed.  Kernels fetched from the Hub (``*_hub``) are refused by the settings
  (they download and run code).  Blocks still on Diffusers' older attention
  processors (SDXL's UNet) keep PyTorch's attention whatever this says.
- ``compile: "regional"``: ``compile_repeated_blocks(fullgraph=True)``: each repeated
  transformer block compiled once and reused (seconds, not the minutes of compiling
  the whole model); the first job of each new size pays the compile, later ones run
  the compiled code.  With a ``lora_dir`` LoRAs are swapped in place (Diffusers' LoRA
  hotswap, ``backends/lora.py``): switching them does not recompile.
- ``step_cache: "first_block"``: Diffusers' first-block cache: when the first block's
  output changed less than ``step_cache_threshold`` (relative) since the last step, the
  other blocks are skipped and their last residual reused. Fewer transformer passes for
  many-step models (Qwen-Image-Edit's 40), at some cost in fidelity; no gain at 4 steps.
  A job's ``cache: "off"`` runs without it (``use_step_cache``; the hooks go for that
  call and come back for the next job that does not say so).
"""

from __future__ import annotations

from typing import Any

from .base import BackendError


def denoiser(pipe: Any) -> Any:
    """The pipeline's transformer, or UNet."""
    return getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)


def set_attention_backend(model: str, pipe: Any, backend: str) -> None:
    if backend == "native":
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [b.value for b in AttentionBackendName if not b.value.endswith("_hub")]
    if backend not in names:
        raise BackendError(f"model {model!r}: attention_backend {backend!r} is not one Diffusers has; one of: {', '.join(names)}")
    try:
        denoiser(pipe).set_attention_backend(backend)
    except (ImportError, RuntimeError, ValueError) as exc:  # its package is not installed, or not on this device
        raise BackendError(
            f"model {model!r}: attention_backend {backend!r} cannot run here ({exc}); install its package or use 'native'"
        ) from exc


def reset_attention_backend(pipe: Any, backend: str) -> None:
    """Back to PyTorch's attention (the choice is also Diffusers' process-wide default)."""
    if backend == "native" or denoiser(pipe) is None:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    denoiser(pipe).reset_attention_backend()
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def compile_regional(model: str, pipe: Any) -> None:
    """``compile_repeated_blocks(fullgraph=True)`` on the denoiser."""
    try:
        denoiser(pipe).compile_repeated_blocks(fullgraph=True)
    except ValueError as exc:  # no _repeated_blocks on this model class
        raise BackendError(f"model {model!r}: compile 'regional' does not apply to this model ({exc}); set compile to 'off'") from exc


def enable_step_cache(pipe: Any, threshold: float) -> None:
    """Diffusers' first-block cache on the transformer (reset by the pipeline after each call)."""
    from diffusers import FirstBlockCacheConfig

    denoiser(pipe).enable_cache(FirstBlockCacheConfig(threshold=threshold))


def use_step_cache(pipe: Any, cfg: Any, wanted: str | None) -> None:
    """A call's step cache: the model's ``step_cache`` unless the job says ``cache: "off"``."""
    if cfg.step_cache == "off":
        return
    model = denoiser(pipe)
    on = wanted != "off"
    if on and not model.is_cache_enabled:
        enable_step_cache(pipe, cfg.step_cache_threshold)
    elif not on and model.is_cache_enabled:
        model.disable_cache()


def apply_speed_knobs(model: str, pipe: Any, cfg: Any) -> None:
    """The model's ``attention_backend``, ``step_cache`` and ``compile``, once it is on its device."""
    set_attention_backend(model, pipe, cfg.attention_backend)
    if cfg.step_cache == "first_block":
        enable_step_cache(pipe, cfg.step_cache_threshold)
    if cfg.compile == "regional":
        if cfg.lora_dir is not None:  # LoRAs are then swapped in place (backends/lora.py): prepared before the first one
            pipe.enable_lora_hotswap(target_rank=cfg.lora_max_rank)
        compile_regional(model, pipe)
