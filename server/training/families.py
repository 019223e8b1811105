"""What LoRA training needs to know about each trainable pipeline family.

A family says which transformer modules get LoRA layers, how an image becomes the
latents the transformer denoises and a caption its conditioning (computed once per
image, then cached), how the transformer is called on a noisy batch, and how the
pipeline shifts its noise levels for a given resolution.  Everything else (the loop,
the loss, checkpoints) is shared in ``lora_trainer``.

Both families use the same flow-matching convention: ``x_t = (1 - σ) x0 + σ noise``
and the transformer predicts the velocity ``noise - x0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..families import TRAINABLE


@dataclass
class Conditioning:
    """One caption's cached text conditioning."""

    embeds: torch.Tensor  # (L, D)
    ids: torch.Tensor | None = None  # FLUX.2 text position ids (L, 4)


class Family:
    """Base: the per-pipeline hooks of the training loop."""

    name: ClassVar[str]
    target_modules: ClassVar[tuple[str, ...]]

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.device = pipe._execution_device
        self.dtype = pipe.transformer.dtype

    # ------------------------------------------------------------- caching (no grad)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> the latent (C, h, w) the transformer denoises."""
        raise NotImplementedError

    def encode_caption(self, caption: str) -> Conditioning:
        raise NotImplementedError

    # ------------------------------------------------------------- training step

    def seq_len(self, latent_shape: torch.Size) -> int:
        """Image tokens of one latent (C, h, w), for the resolution-dependent shift."""
        raise NotImplementedError

    def mu(self, seq_len: int) -> float:
        """The pipeline's dynamic-shift parameter at this many image tokens."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, conds: list[Conditioning]) -> torch.Tensor:
        """The velocity (noise - x0) predicted for ``noisy`` (B, C, h, w)."""
        raise NotImplementedError

    def sigmas(self, u: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Map uniform-ish samples ``u`` in (0, 1) to noise levels the way the
        pipeline's scheduler shifts them at inference (static ``shift``, or the
        resolution-dependent ``mu`` when ``use_dynamic_shifting``)."""
        scheduler = self.pipe.scheduler
        cfg = scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            return scheduler.time_shift(self.mu(seq_len), 1.0, u)  # type: ignore[no-any-return]
        shift = float(cfg.get("shift", 1.0))
        return shift * u / (1 + (shift - 1) * u)

    def pixels_to_tensor(self, image: Any) -> torch.Tensor:
        """A PIL image (already at its training size) -> (1, 3, H, W) in [-1, 1]."""
        tensor = self.pipe.image_processor.preprocess(image, height=image.height, width=image.width)
        return tensor.to(self.pipe.vae.device, self.pipe.vae.dtype)  # type: ignore[no-any-return]


class Flux2KleinFamily(Family):
    name = "flux2_klein"
    target_modules = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "to_qkv_mlp_proj",
    )  # fmt: skip
    inference_steps = 4  # compute_empirical_mu also depends on the step count; klein is distilled to ~4

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # the pipeline's own reference-image encoder: VAE mode, 2x2 patchify, batch-norm
        return self.pipe._encode_vae_image(pixels, generator=None)[0]  # type: ignore[no-any-return]

    def encode_caption(self, caption: str) -> Conditioning:
        embeds, ids = self.pipe.encode_prompt(prompt=[caption], device=self.device)
        return Conditioning(embeds[0], ids[0])

    def seq_len(self, latent_shape: torch.Size) -> int:
        return int(latent_shape[-2] * latent_shape[-1])

    def mu(self, seq_len: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return compute_empirical_mu(seq_len, self.inference_steps)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, conds: list[Conditioning]) -> torch.Tensor:
        pipe = self.pipe
        b, c, h, w = noisy.shape
        ids = pipe._prepare_latent_ids(noisy).to(noisy.device)
        text_ids = torch.stack([cond.ids for cond in conds if cond.ids is not None])
        out = self.transformer(
            hidden_states=pipe._pack_latents(noisy).to(self.dtype),
            timestep=sigmas.to(self.dtype),  # the pipeline passes t / 1000 = σ
            guidance=None,
            encoder_hidden_states=torch.stack([cond.embeds for cond in conds]),
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)  # type: ignore[no-any-return]


class ZImageFamily(Family):
    name = "z_image"
    target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(pixels).latent_dist.mode()
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor)[0]  # type: ignore[no-any-return]

    def encode_caption(self, caption: str) -> Conditioning:
        return Conditioning(self.pipe._encode_prompt([caption], device=self.device)[0])

    def seq_len(self, latent_shape: torch.Size) -> int:
        return int(latent_shape[-2] // 2 * (latent_shape[-1] // 2))

    def mu(self, seq_len: int) -> float:
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        cfg = self.pipe.scheduler.config
        return float(
            calculate_shift(
                seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
        )

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, conds: list[Conditioning]) -> torch.Tensor:
        # the pipeline feeds t = 1 - σ and negates the output to get noise - x0
        inputs = list(noisy.to(self.dtype).unsqueeze(2).unbind(0))
        out = self.transformer(inputs, (1 - sigmas).to(self.dtype), [cond.embeds for cond in conds], return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (Flux2KleinFamily, ZImageFamily)}
assert tuple(FAMILIES) == TRAINABLE


def family_for(backend: str) -> type[Family] | None:
    return FAMILIES.get(backend)


def logit_normal(batch: int, generator: torch.Generator) -> torch.Tensor:
    """u = sigmoid(N(0, 1)): noise levels concentrated mid-range (SD3 / FLUX training)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling("logit_normal", batch, 0.0, 1.0, generator=generator)
