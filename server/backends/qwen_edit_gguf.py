"""Qwen-Image-Edit-2509/2511 and FireRed edit (edit only) with a GGUF transformer.

``transformer_path`` (or ``model_path`` naming a ``.gguf`` file) holds the quantized
transformer; everything else comes from ``base_model_path``.  Without a GGUF file the
whole pipeline loads from the Diffusers folder in ``model_path``.  Guidance maps to
``true_cfg_scale``; the negative prompt defaults to a single space so CFG is on.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from . import latent_preview
from .base import BackendError, WorkItem
from .diffusers_common import DiffusersBackend
from .inputs import check_references, inpaint_inputs
from .single_file import load_single_file_transformer, single_file_parts


class QwenEditGGUFBackend(DiffusersBackend):
    latent_rgb = latent_preview.WAN21  # Qwen-Image's VAE is Wan 2.1's

    def _build_pipeline(self) -> Any:
        from diffusers import GGUFQuantizationConfig, QwenImageEditPlusPipeline, QwenImageTransformer2DModel

        parts = single_file_parts(self.cfg, self.name, ".gguf")
        if parts is None:
            return self.from_pretrained(QwenImageEditPlusPipeline, self.cfg.model_path)
        gguf_file, base = parts
        transformer = load_single_file_transformer(
            self, QwenImageTransformer2DModel, gguf_file, base,
            quantization_config=GGUFQuantizationConfig(compute_dtype=self.dtype),
        )  # fmt: skip
        return self.from_pretrained(QwenImageEditPlusPipeline, base, "base_model_path", transformer=transformer)

    def _call_kwargs(self, item: WorkItem) -> tuple[Any, dict[str, Any]]:
        refs = check_references(item.images or ([item.init_image] if item.init_image else []))
        if not refs:
            raise BackendError(f"model {self.name!r} only edits: send at least one reference image")
        if len(refs) > max(self.capabilities.max_images, 1):
            raise BackendError(
                f"model {self.name!r} accepts at most {self.capabilities.max_images} reference images, got {len(refs)}"
            )
        if item.mask is not None:
            return self._inpaint(item, len(refs))
        return self.pipe, {
            "image": refs,
            "width": item.spec.width,
            "height": item.spec.height,
            "true_cfg_scale": self.guidance(item),
            "negative_prompt": item.spec.negative_prompt or " ",
        }

    def _inpaint(self, item: WorkItem, refs: int) -> tuple[Any, dict[str, Any]]:
        """QwenImageEditInpaintPipeline: one image, run at ~1 MP of its aspect whatever
        the size asked (``item``'s spec is replaced by one of that size, for previews; the worker resizes
        the result back and composites it)."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as inpaint

        if refs > 1:
            raise BackendError(f"a masked edit on model {self.name!r} takes one image (the one to edit), got {refs}")
        kwargs = inpaint_inputs(item)
        pipe = self.inpaint_variant("QwenImageEditInpaintPipeline")
        w, h, _ = inpaint.calculate_dimensions(1024 * 1024, item.spec.width / item.spec.height)
        multiple = pipe.vae_scale_factor * 2
        # a new spec for this call, never the stored job's
        item.spec = msgspec.structs.replace(item.spec, width=w // multiple * multiple, height=h // multiple * multiple)
        kwargs.update(true_cfg_scale=self.guidance(item), negative_prompt=item.spec.negative_prompt or " ")
        return pipe, kwargs

    def _token_limit(self, tokenizer: Any) -> int | None:
        # QwenImageEditPlusPipeline (diffusers 0.42) encodes the whole templated prompt: nothing is cut
        return None

    def _spatial_latents(self, pipe: Any, latents: torch.Tensor, item: WorkItem) -> torch.Tensor | None:
        # packed 2x2 tokens -> (B, C, 1, h, w), normalized by latents_mean / latents_std (as ComfyUI's Wan21)
        return pipe._unpack_latents(latents, item.spec.height, item.spec.width, pipe.vae_scale_factor)[:, :, 0]  # type: ignore[no-any-return]

    def _decode_spatial(self, pipe: Any, z: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = z[:, :, None].to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        return vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]  # type: ignore[no-any-return]
