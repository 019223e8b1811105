"""Per-model settings that are each valid alone but wrong for the model's family or
together: found when the settings are read (``config.build_settings`` raises them as
``ConfigError``), not at load or in the middle of a job.

The facts come from the family's record (``server/families.py``); this module only
words the problems.  It imports nothing of torch or Diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .families import FAMILIES

if TYPE_CHECKING:
    from .config import ModelConfig


def gguf_transformer(model: ModelConfig) -> bool:
    """The model loads its transformer from a ``.gguf`` file."""
    path = model.transformer_path or model.model_path or ""
    return path.endswith(".gguf")


def cache_problem(name: str, model: ModelConfig, cache: str) -> str | None:
    """What is wrong with a request's ``cache`` for ``models.<name>``, or None."""
    if model.step_cache == "off":
        takes = " and ".join(k for k, f in FAMILIES.items() if f.step_cache)
        return (
            f"cache {cache!r}: model {name!r} has no step cache (its settings' step_cache is 'off'; the {takes} "
            "backends take one); drop cache, or use a model that enables it"
        )
    return None


def model_problem(name: str, model: ModelConfig) -> str | None:
    """What is wrong with ``models.<name>`` (the message names the key), or None."""
    family = FAMILIES[model.backend]
    key = f"models.{name}"
    if model.torch_dtype == "float16" and not family.float16:
        return (
            f"{key}.torch_dtype 'float16': the {model.backend} family's activations overflow float16 "
            "(black or NaN images); use 'bfloat16' (or 'auto': bfloat16 on CUDA)"
        )
    if model.offload == "sequential" and gguf_transformer(model):
        return (
            f"{key}.offload 'sequential' does not work with a GGUF transformer (accelerate fails re-creating "
            "its quantized parameters at load: Diffusers issue #14691); use offload 'model' or 'none'"
        )
    if model.device_map == "device" and model.offload != "none":
        return (
            f"{key}.device_map 'device' loads every component onto the GPU, which offload {model.offload!r} exists to "
            "avoid (the whole model on the GPU at once, then moved back); use device_map 'auto' (or 'off') with offload"
        )
    if model.device_map == "device" and not model.device.startswith(("cuda", "auto")):
        return (
            f"{key}.device_map 'device' loads the weights straight onto a CUDA device; this model runs on {model.device!r}, "
            "where loading already goes to host memory: use device_map 'auto'"
        )
    if model.quantization == "fp8dq" and model.device.startswith(("cpu", "mps")):
        return (
            f"{key}.quantization 'fp8dq' runs float8 matmuls, which need a CUDA GPU of compute capability 9.0 or "
            f"newer (Hopper); this model runs on {model.device!r}: use 'fp8' (weight-only) or 'none'"
        )
    if model.attention_backend.endswith("_hub"):
        return (
            f"{key}.attention_backend {model.attention_backend!r} downloads and runs a kernel from the Hugging Face Hub, "
            "which easel does not do; install the kernel's package and name its backend without '_hub' (e.g. 'flash')"
        )
    if model.step_cache != "off" and not family.step_cache:
        takes = " and ".join(k for k, f in FAMILIES.items() if f.step_cache)
        return f"{key}.step_cache: only the {takes} backends' transformers take Diffusers' step cache; set it to 'off'"
    if model.quantize_text_encoder and model.quantization == "none":
        return f"{key}.quantize_text_encoder needs quantization 'fp8' or 'fp8dq' (the transformer's); set one, or remove it"
    if model.vae_path is not None and not family.vae_path:
        takes = ", ".join(k for k, f in FAMILIES.items() if f.vae_path)
        return f"{key}.vae_path: only the {takes} backend loads a separate VAE (backend {model.backend!r}); remove it"
    return None
