"""Tiny random-weight Diffusers pipelines, built offline, for tests and benchmarks.

Each ``build_*`` function constructs every component of a real pipeline class with
tiny shapes, then ``save_pretrained``s it into
``path`` in the standard Diffusers layout (``model_index.json`` plus one folder per
component).  Loading such a folder exercises exactly the ``from_pretrained`` path that
real weights take.  Weights are seeded, so the same call writes the same folder.

Helpers beside the builders:

- ``write_qwen_transformer_gguf`` writes the Qwen edit transformer of a built folder
  as a ``.gguf`` file (2-D weights Q8_0, the rest F32), loadable with
  ``QwenImageTransformer2DModel.from_single_file(..., quantization_config=GGUF...)``.
- ``write_transformer_single_file`` writes a transformer as one ``.safetensors`` file
  (optionally float8), like the FP8 FLUX.2-klein variants.
- ``make_lora`` writes a random (non-zero) peft LoRA adapter for the FLUX.2-klein,
  Z-Image or SDXL denoiser with the pipeline class's ``save_lora_weights``.

All need no network; call them with ``HF_HUB_OFFLINE=1`` set to be sure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

# --------------------------------------------------------------------------- tokenizers

QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def byte_symbols() -> list[str]:
    """The 256 GPT-2 byte-level symbols (every byte maps to one printable char)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    n_other = 256 - len(printable)  # the other bytes map to chr(256), chr(257), ...
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(n_other)]


def clip_tokenizer() -> Any:
    """A CLIP tokenizer with 514 tokens: bytes, bytes + ``</w>``, start, end."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def qwen_tokenizer() -> Any:
    """A Qwen2 tokenizer with 264 tokens: 256 bytes plus the Qwen special tokens."""
    from transformers import Qwen2Tokenizer

    tokens = byte_symbols() + QWEN_SPECIAL
    tok = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[],
        unk_token=None,  # type: ignore[arg-type]
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL[1:],
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def qwen_token_id(name: str) -> int:
    return 256 + QWEN_SPECIAL.index(name)


def _qwen3_config(hidden: int, layers: int) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(QWEN_SPECIAL) + 256, hidden_size=hidden, intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=1024, bos_token_id=qwen_token_id("<|endoftext|>"),
        eos_token_id=qwen_token_id("<|im_end|>"), pad_token_id=qwen_token_id("<|endoftext|>"),
    )  # fmt: skip


def _flow_scheduler(**overrides: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**overrides)


def _save(pipe: Any, path: str | Path, safe_serialization: bool = True) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=safe_serialization)
    return out


# --------------------------------------------------------------------------- builders


def build_sdxl(path: str | Path, *, seed: int = 0, scheduler: Any = None, safe_serialization: bool = True) -> Path:
    """A tiny StableDiffusionXLPipeline (~7 MB); returns ``path``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32,
    )  # fmt: skip
    vae = AutoencoderKL(  # 4 blocks: the real 8x downsampling
        block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        norm_num_groups=32,
    )  # fmt: skip
    text_cfg = CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=514, projection_dim=32,
        hidden_act="gelu",
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet,
        text_encoder=CLIPTextModel(text_cfg), text_encoder_2=CLIPTextModelWithProjection(text_cfg),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
        scheduler=scheduler or EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
            steps_offset=1,
        ),
    )  # fmt: skip
    return _save(pipe, path, safe_serialization)


def build_flux2_klein(
    path: str | Path, *, seed: int = 0, scheduler: Any = None, safe_serialization: bool = True, is_distilled: bool = False
) -> Path:
    """A tiny Flux2KleinPipeline (~1 MB): 28-layer hidden-16 Qwen3 text encoder (the
    pipeline stacks hidden states 9/18/27, so joint_attention_dim = 48); ``is_distilled``
    as the step-distilled FLUX.2-klein releases (no classifier-free guidance)."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )  # fmt: skip
    vae = AutoencoderKLFlux2(  # 4 blocks: the real 8x downsampling, so token counts are realistic
        sample_size=32, block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    pipe = Flux2KleinPipeline(
        scheduler=scheduler or _flow_scheduler(),
        vae=vae,
        text_encoder=Qwen3ForCausalLM(_qwen3_config(hidden=16, layers=28)),
        tokenizer=qwen_tokenizer(),
        transformer=transformer,
        is_distilled=is_distilled,
    )
    return _save(pipe, path, safe_serialization)


def build_z_image(path: str | Path, *, seed: int = 0, scheduler: Any = None, safe_serialization: bool = True) -> Path:
    """A tiny ZImagePipeline (~2 MB)."""
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 128, 128],
    )  # fmt: skip
    vae = AutoencoderKL(  # 4 blocks: the real 8x downsampling
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip
    pipe = ZImagePipeline(
        scheduler=scheduler or _flow_scheduler(),
        vae=vae,
        text_encoder=Qwen3Model(_qwen3_config(hidden=16, layers=2)),
        tokenizer=qwen_tokenizer(),
        transformer=transformer,
    )
    return _save(pipe, path, safe_serialization)


def build_qwen_edit(path: str | Path, *, seed: int = 0, scheduler: Any = None, safe_serialization: bool = True) -> Path:
    """A tiny QwenImageEditPlusPipeline (tiny Qwen2.5-VL text/vision encoder).

    Note the pipeline resizes each reference to ~1 MP before VAE encoding
    (``pipeline_qwenimage_edit_plus.VAE_IMAGE_SIZE``); tests lower that global.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0, "vocab_size": len(QWEN_SPECIAL) + 256, "max_position_embeddings": 4096,
            "bos_token_id": qwen_token_id("<|endoftext|>"), "eos_token_id": qwen_token_id("<|im_end|>"),
        },
        vision_config={
            "depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
            "fullatt_block_indexes": [1], "window_size": 112, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=qwen_token_id("<|image_pad|>"), video_token_id=qwen_token_id("<|video_pad|>"),
        vision_start_token_id=qwen_token_id("<|vision_start|>"), vision_end_token_id=qwen_token_id("<|vision_end|>"),
    )  # fmt: skip
    tokenizer = qwen_tokenizer()
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    pipe = QwenImageEditPlusPipeline(
        scheduler=scheduler or _flow_scheduler(),
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
    return _save(pipe, path, safe_serialization)


BUILDERS = {
    "sdxl": build_sdxl,
    "flux2_klein": build_flux2_klein,
    "z_image": build_z_image,
    "qwen_edit_gguf": build_qwen_edit,
}

# --------------------------------------------------------------------------- single files


def _load_transformer_state(model_dir: str | Path, subfolder: str = "transformer") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((Path(model_dir) / subfolder).glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def write_transformer_single_file(model_dir: str | Path, out_file: str | Path, *, fp8: bool = False) -> Path:
    """The transformer of a built folder as one Diffusers-keyed ``.safetensors`` file;
    ``fp8`` stores 2-D weights as float8_e4m3fn like the published FP8 variants."""
    from safetensors.torch import save_file

    state = _load_transformer_state(model_dir)
    if fp8:
        state = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}
    out = Path(out_file)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


FLUX2_VENDOR_NAMES = {  # Diffusers name -> the name in Black Forest Labs' own files
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}  # fmt: skip
FLUX2_VENDOR_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
                       "attn.norm_k": "norm.key_norm"}  # fmt: skip


def flux2_vendor_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The FLUX.2 transformer of a built folder under Black Forest Labs' own key names
    (``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``, norms as
    ``.scale``, the final modulation as (shift, scale)): what Diffusers' single-file
    converter reads."""
    diffusers_state = _load_transformer_state(model_dir)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor]] = {}
    for key, value in diffusers_state.items():
        name, kind = key.rsplit(".", 1)
        norm = "norm_" in name
        if name == "norm_out.linear":
            scale, shift = value.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
            continue
        if name.startswith("transformer_blocks."):
            _, block, inner = name.split(".", 2)
            for group, parts in (("img_attn.qkv", ("to_q", "to_k", "to_v")), ("txt_attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
                if inner.removeprefix("attn.") in parts:
                    fused.setdefault(f"double_blocks.{block}.{group}.{kind}", [None] * 3)[parts.index(inner.removeprefix("attn."))] = value  # type: ignore[list-item]
                    break
            else:
                out[f"double_blocks.{block}.{FLUX2_VENDOR_NAMES[inner]}.{'scale' if norm else kind}"] = value
            continue
        if name.startswith("single_transformer_blocks."):
            _, block, inner = name.split(".", 2)
            out[f"single_blocks.{block}.{FLUX2_VENDOR_SINGLE[inner]}.{'scale' if norm else kind}"] = value
            continue
        out[f"{FLUX2_VENDOR_NAMES[name]}.{kind}"] = value
    out.update({k: torch.cat(v) for k, v in fused.items()})
    return out


def write_flux2_vendor_file(model_dir: str | Path, out_file: str | Path, *, fp8_scaled: bool = False) -> Path:
    """The FLUX.2 transformer of a built folder as one file laid out as Black Forest Labs
    ship theirs (``flux2_vendor_state``); ``fp8_scaled`` as their FP8 releases: each 2-D
    block weight float8_e4m3fn divided by a float32 ``weight_scale`` beside it (and an
    ``input_scale``)."""
    from safetensors.torch import save_file

    state = flux2_vendor_state(model_dir)
    if fp8_scaled:
        for key in [k for k, v in state.items() if v.ndim == 2 and "_blocks." in k]:
            weight = state[key].float()
            scale = weight.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            state[key] = (weight / scale).to(torch.float8_e4m3fn)
            state[key.removesuffix("weight") + "weight_scale"] = scale.reshape(())
            state[key.removesuffix("weight") + "input_scale"] = torch.ones(())
    out = Path(out_file)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def write_qwen_transformer_gguf(model_dir: str | Path, out_file: str | Path) -> Path:
    """The Qwen edit transformer of a built folder as GGUF: 2-D weights whose rows
    are a multiple of 32 as Q8_0, everything else F32."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(out_file), arch="qwen_image")
    for name, tensor in _load_transformer_state(model_dir).items():
        data = tensor.float().numpy()
        if data.ndim == 2 and data.shape[-1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_file)


# --------------------------------------------------------------------------- LoRA

LORA_TARGETS: dict[str, tuple[str, list[str]]] = {
    # backend -> (denoiser component, peft target modules)
    "flux2_klein": ("transformer", ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                    "to_add_out", "to_qkv_mlp_proj"]),
    "z_image": ("transformer", ["to_q", "to_k", "to_v", "to_out.0"]),
    "sdxl": ("unet", ["to_q", "to_k", "to_v", "to_out.0"]),
}  # fmt: skip

PIPELINES = {
    "flux2_klein": "Flux2KleinPipeline",
    "z_image": "ZImagePipeline",
    "sdxl": "StableDiffusionXLPipeline",
}


def make_lora(
    backend: Literal["flux2_klein", "z_image", "sdxl"],
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 4,
    seed: int = 1,
    std: float = 0.5,
) -> Path:
    """Write a random LoRA adapter for the denoiser of a built folder to ``out_dir``
    (``pytorch_lora_weights.safetensors`` inside).  Both LoRA matrices are random
    (``std``) so that the adapter visibly changes outputs."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    component, targets = LORA_TARGETS[backend]
    pipe_cls = getattr(diffusers, PIPELINES[backend])
    _library, class_name = json.loads((Path(model_dir) / "model_index.json").read_text())[component]
    model_cls = getattr(diffusers, class_name)
    denoiser = model_cls.from_pretrained(model_dir, subfolder=component)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(denoiser)
    key = "unet_lora_layers" if component == "unet" else "transformer_lora_layers"
    pipe_cls.save_lora_weights(out, **{key: layers}, safe_serialization=True)
    return out
