"""Stable Diffusion XL: text-to-image, and img2img (``init_image``, or an edit's
first reference) through ``StableDiffusionXLImg2ImgPipeline.from_pipe``."""

from __future__ import annotations

import os
from typing import Any

import torch

from . import latent_preview
from .base import WorkItem
from .diffusers_common import DiffusersBackend
from .inputs import inpaint_inputs


class SDXLBackend(DiffusersBackend):
    latent_rgb = latent_preview.SDXL

    def _build_pipeline(self) -> Any:
        from diffusers import AutoencoderKL, StableDiffusionXLPipeline

        if self.cfg.vae_path is None:
            return self.from_pretrained(StableDiffusionXLPipeline, self.cfg.model_path)
        # e.g. madebyollin/sdxl-vae-fp16-fix: in float16 the pipeline's own VAE is upcast
        # to float32 for every decode (its force_upcast); a fixed one runs in float16
        vae = self.from_pretrained(AutoencoderKL, self.cfg.vae_path, "vae_path", **vae_subfolder(self.cfg.vae_path))
        return self.from_pretrained(StableDiffusionXLPipeline, self.cfg.model_path, vae=vae)

    def _call_kwargs(self, item: WorkItem) -> tuple[Any, dict[str, Any]]:
        from diffusers import StableDiffusionXLImg2ImgPipeline

        kwargs: dict[str, Any] = {"guidance_scale": self.guidance(item), "negative_prompt": item.spec.negative_prompt}
        if item.mask is not None:
            inpaint = inpaint_inputs(item)
            pipe = self.inpaint_variant("StableDiffusionXLInpaintPipeline")
            return pipe, {**kwargs, **inpaint, "width": item.spec.width, "height": item.spec.height}
        img2img = self.img2img_kwargs(item)
        if img2img is None:
            return self.pipe, {**kwargs, "width": item.spec.width, "height": item.spec.height}
        # the img2img pipeline takes its size from the (already resized) source image
        return self.variant("img2img", StableDiffusionXLImg2ImgPipeline), {**kwargs, **img2img}

    def _spatial_latents(self, pipe: Any, latents: torch.Tensor, item: WorkItem) -> torch.Tensor | None:
        return latents  # (B, 4, h, w), scaled by the VAE's scaling_factor

    def _decode_spatial(self, pipe: Any, z: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]  # type: ignore[no-any-return]


def vae_subfolder(path: str) -> dict[str, str]:
    """A VAE folder (``config.json`` inside), or a pipeline folder whose ``vae`` it is."""
    folder = os.path.expanduser(path)
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, "vae")):
        return {"subfolder": "vae"}
    return {}
