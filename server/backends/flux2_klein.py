"""FLUX.2-klein (4B/9B): text-to-image and edits with 1..max_images references.

Weights: a Diffusers folder in ``model_path``; or an FP8/single-file transformer in
``transformer_path`` (or ``model_path`` pointing at a ``.safetensors`` file) with the
rest of the pipeline from ``base_model_path``.  ``quantization: "fp8"`` quantizes
the transformer to float8 weight-only with torchao.
"""

from __future__ import annotations

from typing import Any

import torch

from . import latent_preview
from .base import BackendError, WorkItem
from .diffusers_common import DiffusersBackend, check_references
from .single_file import load_single_file_transformer, single_file_parts


class Flux2KleinBackend(DiffusersBackend):
    latent_rgb = latent_preview.FLUX2

    def _build_pipeline(self) -> Any:
        from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

        if self.cfg.quantization == "fp8":
            check_torchao()
        parts = single_file_parts(self.cfg, self.name, ".safetensors")
        if parts is None:
            pipe = self.from_pretrained(Flux2KleinPipeline, self.cfg.model_path)
        else:
            transformer_file, base = parts
            transformer = load_single_file_transformer(self, Flux2Transformer2DModel, transformer_file, base)
            pipe = self.from_pretrained(Flux2KleinPipeline, base, "base_model_path", transformer=transformer)
        if self.cfg.quantization == "fp8":
            quantize_fp8(pipe.transformer)
        return pipe

    def _call_kwargs(self, item: WorkItem) -> tuple[Any, dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "width": item.width,
            "height": item.height,
            "guidance_scale": self.guidance(item),
        }
        refs = check_references(item.images) if item.task == "edit" else []
        if item.task == "edit" and not refs:
            raise BackendError("an edit needs at least one reference image")
        if len(refs) > max(self.capabilities.max_images, 1):
            raise BackendError(
                f"model {self.name!r} accepts at most {self.capabilities.max_images} reference images, got {len(refs)}"
            )
        if refs and item.mask is not None:  # inpaint images[0]; the others are references
            kwargs.update(self.inpaint_kwargs(item), image_reference=refs[1:] or None)
        elif refs:
            kwargs["image"] = refs
        if item.negative_prompt and self.guidance(item) > 1 and not self.pipe.config.is_distilled:
            # the pipeline has no negative_prompt argument, only pre-computed embeddings
            with torch.no_grad():
                kwargs["negative_prompt_embeds"] = self.pipe.encode_prompt(prompt=item.negative_prompt)[0]
        if item.mask is not None:
            return self.inpaint_variant("Flux2KleinInpaintPipeline"), kwargs
        return self.pipe, kwargs

    def _rows_kwargs(self, kwargs: dict[str, Any], negatives: list[str | None]) -> dict[str, Any]:
        if "negative_prompt_embeds" in kwargs:  # one row each, as ``_call_kwargs`` encodes one
            with torch.no_grad():
                kwargs["negative_prompt_embeds"] = self.pipe.encode_prompt(prompt=[n or "" for n in negatives])[0]
        return kwargs

    def _prompt_text(self, tokenizer: Any, prompt: str) -> str:
        # as the pipeline's encode_prompt builds it
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)  # type: ignore[no-any-return]

    def _spatial_latents(self, pipe: Any, latents: torch.Tensor, item: WorkItem) -> torch.Tensor | None:
        # latents: (B, h*w, 4C) tokens in row-major order over the packed (2x2-patchified),
        # batch-normalized grid -> (B, C, 2h, 2w), still normalized (as ComfyUI's Flux2 format)
        f = pipe.vae_scale_factor * 2
        h, w = item.height // f, item.width // f
        x = latents.reshape(latents.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return pipe._unpatchify_latents(x)  # type: ignore[no-any-return]

    def _decode_spatial(self, pipe: Any, z: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = pipe._patchify_latents(z)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
        x = pipe._unpatchify_latents(x * std + mean)
        return vae.decode(x.to(vae.dtype), return_dict=False)[0]  # type: ignore[no-any-return]


def check_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise BackendError(
            "quantization 'fp8' needs torchao, which is not installed; run `pip install torchao` or set quantization to 'none'"
        ) from None


def quantize_fp8(module: torch.nn.Module) -> None:
    """Float8 weight-only quantization of ``module`` in place (torchao)."""
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Float8WeightOnlyConfig

        quantize_(module, Float8WeightOnlyConfig())
    except ImportError:  # older torchao
        from torchao.quantization import float8_weight_only

        quantize_(module, float8_weight_only())
