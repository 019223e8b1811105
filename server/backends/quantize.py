"""torchao quantization of a loaded denoiser (``models.NAME.quantization``).

- ``fp8``: float8 weight-only (``Float8WeightOnlyConfig``): halves the transformer's
  memory against bf16; not faster (the weights are widened for each matmul).
- ``fp8dq``: float8 dynamic activations and weights, per row
  (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``): the matmuls
  themselves run in float8 (CUDA, compute capability 9.0 or newer: Hopper), faster
  with ``compile``.

Quantization runs where the module's weights are: on the GPU after the move (seconds;
on the CPU it takes tens of seconds for a 9B transformer), on the CPU only when the
model is offloaded (its weights live there between calls).
"""

from __future__ import annotations

from typing import Any

from .base import BackendError

HOPPER = (9, 0)


def check_torchao(mode: str) -> None:
    """torchao is installed (and new enough: 0.18's config classes)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig  # noqa: F401
    except ImportError as exc:
        raise BackendError(
            f"quantization {mode!r} needs torchao (0.18 or newer: {exc}); run `pip install -r requirements-gpu.txt` "
            "(or `pip install torchao`) or set quantization to 'none'"
        ) from None


def check_fp8dq_device(device: str) -> None:
    """``fp8dq`` runs float8 matmuls: CUDA with compute capability 9.0 or newer only."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise BackendError(
            f"quantization 'fp8dq' runs float8 matmuls, which need a CUDA GPU (Hopper or newer); this model runs on "
            f"{device!r}: use quantization 'fp8' (weight-only) or 'none'"
        )
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < HOPPER:
        raise BackendError(
            f"quantization 'fp8dq' needs a GPU of compute capability 9.0 or newer (Hopper); {torch.cuda.get_device_name(device)} "
            f"is {capability[0]}.{capability[1]}: use quantization 'fp8' (weight-only) or 'none'"
        )


def quantize_config(mode: str) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    if mode == "fp8":
        return Float8WeightOnlyConfig()
    if mode == "fp8dq":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise BackendError(f"unknown quantization {mode!r}; use 'none', 'fp8' or 'fp8dq'")


def quantize(module: Any, mode: str) -> None:
    """``module``'s linear layers quantized in place, on the device they are on."""
    from torchao.quantization import quantize_

    quantize_(module, quantize_config(mode))
