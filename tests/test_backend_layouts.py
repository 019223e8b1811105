"""The loaders depend only on the standard Diffusers layout, not on quirks of
``tests/tiny_pipelines.py``: folders assembled here another way (other component
shapes and options, another scheduler, pickled or sharded weights) load and run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import torch

from tests.backend_helpers import RecordingContext, item, load_backend, max_diff, write_alternative_z_image

if TYPE_CHECKING:
    from pathlib import Path

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = [pytest.mark.usefixtures("tiny_runtime"), pytest.mark.timeout(120)]


def test_z_image_folder_with_pickled_weights_and_other_shapes_loads(tmp_path: Path) -> None:
    write_alternative_z_image(tmp_path)
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
