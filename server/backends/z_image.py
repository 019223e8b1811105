"""Z-Image (e.g. Z-Image-Turbo): text-to-image, and img2img (``init_image``, or an
edit's first reference) through ``ZImageImg2ImgPipeline.from_pipe``."""

from __future__ import annotations

from typing import Any

import torch

from . import latent_preview
from .base import WorkItem
from .diffusers_common import DiffusersBackend
from .inputs import inpaint_inputs


class ZImageBackend(DiffusersBackend):
    latent_rgb = latent_preview.FLUX1  # Z-Image uses the FLUX.1 VAE

    def _build_pipeline(self) -> Any:
        from diffusers import ZImagePipeline

        return self.from_pretrained(ZImagePipeline, self.cfg.model_path)

    def _call_kwargs(self, item: WorkItem) -> tuple[Any, dict[str, Any]]:
        from diffusers import ZImageImg2ImgPipeline

        kwargs: dict[str, Any] = {
            "width": item.spec.width,
            "height": item.spec.height,
            "guidance_scale": self.guidance(item),
            "negative_prompt": item.spec.negative_prompt,
        }
        if item.mask is not None:
            return self.inpaint_variant("ZImageInpaintPipeline"), {**kwargs, **inpaint_inputs(item)}
        img2img = self.img2img_kwargs(item)
        if img2img is None:
            return self.pipe, kwargs
        return self.variant("img2img", ZImageImg2ImgPipeline), {**kwargs, **img2img}

    def _batchable(self, item: WorkItem) -> bool:
        # ZImageImg2ImgPipeline draws the VAE sample of the source from generator[0]
        # before the noise, so image k of a batch would differ from seed + k alone
        return item.init_image is None and not item.images

    def _prompt_text(self, tokenizer: Any, prompt: str) -> str:
        # as the pipeline's encode_prompt builds it
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)  # type: ignore[no-any-return]

    def _spatial_latents(self, pipe: Any, latents: torch.Tensor, item: WorkItem) -> torch.Tensor | None:
        return latents  # (B, 16, h, w): the FLUX.1 VAE's latents, shifted and scaled

    def _decode_spatial(self, pipe: Any, z: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(x, return_dict=False)[0]  # type: ignore[no-any-return]
