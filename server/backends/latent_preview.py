"""Cheap previews: intermediate latents projected linearly to RGB ("latent2rgb").

A preview never runs the VAE: each latent channel contributes a fixed RGB weight
(a ``C x 3`` matrix plus a bias), applied to the latents as the transformer sees
them (scaled / normalized, unpacked to a ``C x h x w`` grid), at most
``PREVIEW_SIDE`` pixels a side.  The result is in [-1, 1], like a VAE decode.

Published factors (ComfyUI's ``comfy/latent_formats.py``; numbers only) exist for
the real models' latent spaces:

- SD-XL: 4 channels (``SDXL``).
- Z-Image: the FLUX.1 VAE, 16 channels (ComfyUI's ``Flux`` format: ``FLUX1``).
- FLUX.2: 32 channels, packed 2x2 into the pipeline's 128 (ComfyUI's ``Flux2``
  format, applied after unpatchifying: ``FLUX2``).
- Qwen-Image: the Wan 2.1 VAE, 16 channels normalized by its ``latents_mean`` /
  ``latents_std`` (ComfyUI's ``Wan21``, which it also uses for Qwen-Image: ``WAN21``).

When a model's VAE has another latent channel count (e.g. the tiny random-weight test
pipelines), ``fit_latent_rgb`` fits the map once when the model loads: a least-squares
fit of a few random latents against their VAE decode, downscaled to the latent grid
(one small decode; cached on the backend for as long as the model stays loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from .base import preview_size

if TYPE_CHECKING:
    from collections.abc import Sequence

Factors = tuple["Sequence[Sequence[float]]", "Sequence[float]"]  # (C x 3 weights, 3 biases)

SDXL: Factors = (
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
    [0.1084, -0.0175, -0.0011],
)

FLUX1: Factors = (
    [
        [-0.0346, 0.0244, 0.0681],
        [0.0034, 0.0210, 0.0687],
        [0.0275, -0.0668, -0.0433],
        [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329],
        [0.0004, 0.0383, 0.0115],
        [0.0405, 0.0861, 0.0915],
        [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180],
        [0.1008, 0.0755, -0.0421],
        [-0.0515, 0.0201, 0.0011],
        [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749],
        [-0.1264, -0.0522, -0.1103],
        [-0.0280, -0.0881, -0.0499],
        [-0.1262, -0.0982, -0.0778],
    ],
    [-0.0329, -0.0718, -0.0851],
)

FLUX2: Factors = (
    [
        [0.0058, 0.0113, 0.0073],
        [0.0495, 0.0443, 0.0836],
        [-0.0099, 0.0096, 0.0644],
        [0.2144, 0.3009, 0.3652],
        [0.0166, -0.0039, -0.0054],
        [0.0157, 0.0103, -0.0160],
        [-0.0398, 0.0902, -0.0235],
        [-0.0052, 0.0095, 0.0109],
        [-0.3527, -0.2712, -0.1666],
        [-0.0301, -0.0356, -0.0180],
        [-0.0107, 0.0078, 0.0013],
        [0.0746, 0.0090, -0.0941],
        [0.0156, 0.0169, 0.0070],
        [-0.0034, -0.0040, -0.0114],
        [0.0032, 0.0181, 0.0080],
        [-0.0939, -0.0008, 0.0186],
        [0.0018, 0.0043, 0.0104],
        [0.0284, 0.0056, -0.0127],
        [-0.0024, -0.0022, -0.0030],
        [0.1207, -0.0026, 0.0065],
        [0.0128, 0.0101, 0.0142],
        [0.0137, -0.0072, -0.0007],
        [0.0095, 0.0092, -0.0059],
        [0.0000, -0.0077, -0.0049],
        [-0.0465, -0.0204, -0.0312],
        [0.0095, 0.0012, -0.0066],
        [0.0290, -0.0034, 0.0025],
        [0.0220, 0.0169, -0.0048],
        [-0.0332, -0.0457, -0.0468],
        [-0.0085, 0.0389, 0.0609],
        [-0.0076, 0.0003, -0.0043],
        [-0.0111, -0.0460, -0.0614],
    ],
    [-0.0329, -0.0718, -0.0851],
)

WAN21: Factors = (
    [
        [-0.1299, -0.1692, 0.2932],
        [0.0671, 0.0406, 0.0442],
        [0.3568, 0.2548, 0.1747],
        [0.0372, 0.2344, 0.1420],
        [0.0313, 0.0189, -0.0328],
        [0.0296, -0.0956, -0.0665],
        [-0.3477, -0.4059, -0.2925],
        [0.0166, 0.1902, 0.1975],
        [-0.0412, 0.0267, -0.1364],
        [-0.1293, 0.0740, 0.1636],
        [0.0680, 0.3019, 0.1128],
        [0.0032, 0.0581, 0.0639],
        [-0.1251, 0.0927, 0.1699],
        [0.0060, -0.0633, 0.0005],
        [0.3477, 0.2275, 0.2950],
        [0.1984, 0.0913, 0.1861],
    ],
    [-0.1835, -0.0868, -0.3360],
)

FIT_GRID = 16  # the random latents of a fit: FIT_SAMPLES x C x FIT_GRID x FIT_GRID
FIT_SAMPLES = 2


class LatentRGB:
    """A linear latent -> RGB map (weights ``C x 3``, bias ``3``), with copies per device."""

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor, fitted: bool) -> None:
        self.weights = weights.float().cpu()
        self.bias = bias.float().cpu()
        self.fitted = fitted  # fitted at load (no published factors for this latent space)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def channels(self) -> int:
        return int(self.weights.shape[0])

    @classmethod
    def published(cls, factors: Factors) -> LatentRGB:
        return cls(torch.tensor(factors[0]), torch.tensor(factors[1]), fitted=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.weights.to(device), self.bias.to(device))
        return self._on[device]

    def project(self, z: torch.Tensor, width: int, height: int) -> Image.Image:
        """``z`` (C, h, w) latents -> an RGB image of ``preview_size(width, height)``."""
        w, h = preview_size(width, height)
        z = z.float()
        if z.shape[-1] > w or z.shape[-2] > h:  # never project more than the preview shows
            z = F.adaptive_avg_pool2d(z, (min(h, z.shape[-2]), min(w, z.shape[-1])))
        weights, bias = self.on(z.device)
        rgb = torch.einsum("chw,cr->hwr", z, weights) + bias
        pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
        image = Image.fromarray(pixels, "RGB")
        return image if image.size == (w, h) else image.resize((w, h), Image.Resampling.BILINEAR)


def fit_latent_rgb(decode: Callable[[torch.Tensor], torch.Tensor], channels: int, device: str, dtype: torch.dtype) -> LatentRGB:
    """Least-squares latent -> RGB map of a VAE: ``decode`` takes (N, C, h, w) latents
    as the transformer sees them and returns (N, 3, H, W) in [-1, 1]; one decode of
    ``FIT_SAMPLES`` random latents of ``FIT_GRID`` a side (seeded: the same every load)."""
    z = torch.randn(FIT_SAMPLES, channels, FIT_GRID, FIT_GRID, generator=torch.Generator("cpu").manual_seed(0))
    with torch.no_grad():
        image = decode(z.to(device, dtype)).float().cpu()
    target = F.adaptive_avg_pool2d(image, (FIT_GRID, FIT_GRID))  # the pixels each latent covers
    x = z.permute(0, 2, 3, 1).reshape(-1, channels)
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x, y).solution  # (C + 1, 3)
    return LatentRGB(solution[:channels], solution[channels], fitted=True)
