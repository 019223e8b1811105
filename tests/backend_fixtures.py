"""Session-scoped pytest fixtures: tiny Diffusers model folders built once per run.

Use from a test module with::

    pytest_plugins = ["tests.backend_fixtures"]

Fixtures: ``tiny_sdxl``, ``tiny_flux2_klein``, ``tiny_z_image``, ``tiny_qwen_edit``
(folders), ``tiny_model_dirs`` (backend key -> folder), ``qwen_gguf`` (a Q8_0 GGUF of
the tiny Qwen transformer), ``lora_dirs`` (backend key -> a ``lora_dir`` holding one
random adapter named ``style``), and ``tiny_runtime`` (one torch thread, and a
64x64 instead of ~1 MP reference resize in QwenImageEditPlus; use it in every test
that runs a tiny pipeline).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers import

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import tiny_pipelines as tp

if TYPE_CHECKING:
    from collections.abc import Iterator

LORA_BACKENDS = ("flux2_klein", "z_image", "sdxl")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_root: Path) -> Path:
    return tp.build_sdxl(tiny_root / "sdxl")


@pytest.fixture(scope="session")
def tiny_flux2_klein(tiny_root: Path) -> Path:
    return tp.build_flux2_klein(tiny_root / "flux2_klein")


@pytest.fixture(scope="session")
def tiny_z_image(tiny_root: Path) -> Path:
    return tp.build_z_image(tiny_root / "z_image")


@pytest.fixture(scope="session")
def tiny_qwen_edit(tiny_root: Path) -> Path:
    return tp.build_qwen_edit(tiny_root / "qwen_edit")


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_sdxl: Path, tiny_flux2_klein: Path, tiny_z_image: Path, tiny_qwen_edit: Path) -> dict[str, Path]:
    return {"sdxl": tiny_sdxl, "flux2_klein": tiny_flux2_klein, "z_image": tiny_z_image, "qwen_edit_gguf": tiny_qwen_edit}


@pytest.fixture(scope="session")
def qwen_gguf(tiny_qwen_edit: Path, tiny_root: Path) -> Path:
    return tp.write_qwen_transformer_gguf(tiny_qwen_edit, tiny_root / "qwen_transformer-Q8_0.gguf")


@pytest.fixture(scope="session")
def lora_dirs(tiny_model_dirs: dict[str, Path], tiny_root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for backend in LORA_BACKENDS:
        root = tiny_root / f"loras_{backend}"
        tp.make_lora(backend, tiny_model_dirs[backend], root / "style")  # type: ignore[arg-type]
        out[backend] = root
    return out


@pytest.fixture(scope="session")
def tiny_runtime() -> Iterator[None]:
    """Settings for running tiny pipelines fast on a small shared CPU:

    - one torch thread: tiny ops gain nothing from threads, and on an oversubscribed
      machine OpenMP spin-waiting made the suite ~7x slower;
    - QwenImageEditPlus resizes every reference to ~1 MP before VAE encoding (~8 s
      per reference with the tiny VAE on CPU), and QwenImageEditInpaint generates at
      ~1 MP; tests use 64x64.
    """
    import torch
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as qwen_inpaint
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen_plus

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dimensions = qwen_inpaint.calculate_dimensions
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qwen_plus, "VAE_IMAGE_SIZE", 64 * 64)
        # QwenImageEditInpaint runs at ~1 MP whatever the size asked: 64x64 here
        mp.setattr(qwen_inpaint, "calculate_dimensions", lambda _area, ratio: dimensions(64 * 64, ratio))
        yield
    torch.set_num_threads(threads)
