"""The loaders depend only on the standard Diffusers layout, not on quirks of
``tests/tiny_pipelines.py``: folders assembled here another way (other component
shapes and options, another scheduler, pickled or sharded weights) load and run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import torch

from tests.backend_helpers import RecordingContext, item, load_backend, max_diff
from tests.tiny_pipelines import qwen_tokenizer

if TYPE_CHECKING:
    from pathlib import Path

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = [pytest.mark.usefixtures("tiny_runtime"), pytest.mark.timeout(120)]


def test_z_image_folder_with_pickled_weights_and_other_shapes_loads(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(42)
    pipe: Any = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000),
        vae=AutoencoderKL(
            block_out_channels=[16, 32], latent_channels=16, norm_num_groups=8, layers_per_block=2,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            scaling_factor=0.5, shift_factor=0.0,
        ),
        text_encoder=Qwen3Model(Qwen3Config(
            vocab_size=264, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=3,
            num_key_value_heads=3, head_dim=8,
        )),
        tokenizer=qwen_tokenizer(),
        transformer=ZImageTransformer2DModel(
            dim=48, n_layers=1, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=24,
            axes_dims=[8, 4, 4], axes_lens=[128, 16, 16],
        ),
    )  # fmt: skip
    # (Diffusers 0.42 writes sharded .bin files but cannot read them back, so unsharded)
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.bin").is_file()

    backend = load_backend("z_image", model_path=str(tmp_path))
    a = backend.run(item(width=64, height=48), RecordingContext())[0]
    b = backend.run(item(width=64, height=48), RecordingContext())[0]
    assert a.size == (64, 48) and max_diff(a, b) == 0


def test_distilled_flux2_klein_folder_with_another_scheduler_loads(tiny_flux2_klein: Path, tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    source = Flux2KleinPipeline.from_pretrained(tiny_flux2_klein)
    pipe: Any = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.3, max_shift=1.0),
        vae=source.vae,
        text_encoder=source.text_encoder,
        tokenizer=source.tokenizer,
        transformer=source.transformer,
        is_distilled=True,
    )
    pipe.save_pretrained(tmp_path, max_shard_size="50KB")
    assert list(tmp_path.glob("transformer/*.safetensors.index.json")), "expected sharded weights"
    backend = load_backend("flux2_klein", model_path=str(tmp_path))
    ctx = RecordingContext()
    images = backend.run(item("edit", images=[source.image_processor.numpy_to_pil(torch.rand(1, 64, 96, 3).numpy())[0]],
                              guidance=4.0), ctx)  # fmt: skip
    assert images[0].size == (64, 64) and ctx.steps == [(1, 2), (2, 2)]
