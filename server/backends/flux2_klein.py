"""FLUX.2-klein (4B/9B): text-to-image and edits with 1..max_images references.

Weights: a Diffusers folder in ``model_path``; or an FP8/single-file transformer in
``transformer_path`` (or ``model_path`` pointing at a ``.safetensors`` file) with the
rest of the pipeline from ``base_model_path`` (a scaled-FP8 file, as Black Forest Labs
ship theirs, is refused: Diffusers cannot apply its scales).  ``quantization: "fp8"``
(weight-only) or ``"fp8dq"`` (dynamic activations, Hopper) quantizes the transformer
with torchao (``quantize.py``) on its device.
"""

from __future__ import annotations

from typing import Any

import torch

from . import latent_preview
from .base import BackendError, WorkItem
from .diffusers_common import DiffusersBackend
from .inputs import check_references, inpaint_inputs
from .quantize import check_fp8dq_device, check_torchao, quantize
from .single_file import load_single_file_transformer, single_file_parts


class Flux2KleinBackend(DiffusersBackend):
    latent_rgb = latent_preview.FLUX2

    def _build_pipeline(self) -> Any:
        from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

        mode = self.cfg.quantization
        if mode != "none":
            check_torchao(mode)
        if mode == "fp8dq":
            check_fp8dq_device(self.device)
        parts = single_file_parts(self.cfg, self.name, ".safetensors")
        if parts is None:
            pipe = self.from_pretrained(Flux2KleinPipeline, self.cfg.model_path)
        else:
            transformer_file, base = parts
            check_flux2_single_file(self.name, transformer_file)
            transformer = load_single_file_transformer(self, Flux2Transformer2DModel, transformer_file, base)
            pipe = self.from_pretrained(Flux2KleinPipeline, base, "base_model_path", transformer=transformer)
        if mode != "none" and self.cfg.offload != "none":  # offloaded: its weights stay on the CPU between calls
            self._quantize(pipe)
        return pipe

    def _placed(self, pipe: Any) -> None:
        if self.cfg.quantization != "none" and self.cfg.offload == "none":  # on the device: seconds, not tens of seconds
            self._quantize(pipe)
        super()._placed(pipe)

    def _quantize(self, pipe: Any) -> None:
        quantize(pipe.transformer, self.cfg.quantization)
        if self.cfg.quantize_text_encoder:  # 9B's Qwen3-8B is as large as its transformer; it runs once per prompt
            quantize(pipe.text_encoder, "fp8")

    def _call_kwargs(self, item: WorkItem) -> tuple[Any, dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "width": item.spec.width,
            "height": item.spec.height,
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
            kwargs.update(inpaint_inputs(item), image_reference=refs[1:] or None)
        elif refs:
            kwargs["image"] = refs
        if item.spec.negative_prompt and self.guidance(item) > 1 and not self.pipe.config.is_distilled:
            # the pipeline has no negative_prompt argument, only pre-computed embeddings
            with torch.no_grad():
                kwargs["negative_prompt_embeds"] = self.pipe.encode_prompt(prompt=item.spec.negative_prompt)[0]
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
        h, w = item.spec.height // f, item.spec.width // f
        x = latents.reshape(latents.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return pipe._unpatchify_latents(x)  # type: ignore[no-any-return]

    def _decode_spatial(self, pipe: Any, z: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        x = pipe._patchify_latents(z)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
        x = pipe._unpatchify_latents(x * std + mean)
        return vae.decode(x.to(vae.dtype), return_dict=False)[0]  # type: ignore[no-any-return]


def check_flux2_single_file(model: str, path: str) -> None:
    """Refuse a scaled-FP8 file (``...weight_scale`` beside each float8 weight, as Black
    Forest Labs ship their FP8 releases): Diffusers' FLUX.2 converter does not apply the
    scales (it fails on them, or would load wrong weights)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        scales = [k for k in f.keys() if k.endswith(("weight_scale", "scale_weight"))]  # noqa: SIM118
    if scales:
        raise BackendError(
            f"transformer file {path!r} of model {model!r} holds scaled FP8 weights ({len(scales)} tensors like "
            f"{scales[0]!r}), which Diffusers cannot load: use the bf16 Diffusers folder (e.g. "
            "black-forest-labs/FLUX.2-klein-4B) as model_path with quantization 'fp8' (FP8 weights, quantized at load)"
        )
