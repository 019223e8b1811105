"""Backend fixes found by reading Diffusers 0.42 against the backends (issue 30, part 1),
each shown on the tiny random-weight pipelines on the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import torch
from PIL import Image

from tests import tiny_pipelines as tp
from tests.backend_helpers import RecordingContext, item, load_backend, max_diff, reference

if TYPE_CHECKING:
    from pathlib import Path

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = [pytest.mark.usefixtures("tiny_runtime"), pytest.mark.timeout(120)]


def square_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


def transformer_calls(backend: object, work: object) -> int:
    """How many times the denoiser's forward ran during one job."""
    calls: list[int] = []
    transformer = backend.pipe.transformer  # type: ignore[attr-defined]
    hook = transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        backend.run(work, RecordingContext())  # type: ignore[attr-defined]
    finally:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize(("distilled", "per_step"), [(True, 1), (False, 2)])
def test_masked_edit_on_flux2_klein_keeps_is_distilled(tmp_path: Path, distilled: bool, per_step: int) -> None:
    """The inpaint pipeline built from the loaded components keeps the model's
    ``is_distilled``: a distilled model runs no classifier-free guidance (one transformer
    call per step) even with guidance > 1; the base model runs two."""
    folder = tp.build_flux2_klein(tmp_path / "klein", is_distilled=distilled)
    backend = load_backend("flux2_klein", model_path=str(folder))
    work = item("edit", images=[reference(64, 64)], mask=square_mask(), guidance=4.0, steps=2)
    assert transformer_calls(backend, work) == 2 * per_step
    assert backend._variants["inpaint"].config.is_distilled is distilled  # type: ignore[attr-defined]


def test_sdxl_vae_path_loads_that_vae_in_place_of_the_pipelines(tiny_sdxl: Path, tmp_path: Path) -> None:
    """``vae_path`` (e.g. an fp16-fixed SDXL VAE): that folder's weights decode, not the pipeline's."""
    from diffusers import AutoencoderKL

    source = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    fixed = AutoencoderKL.from_config({**source.config, "force_upcast": False})  # other (seeded) random weights
    fixed.save_pretrained(tmp_path / "vae-fix")
    plain = load_backend("sdxl", model_path=str(tiny_sdxl))
    backend = load_backend("sdxl", model_path=str(tiny_sdxl), vae_path=str(tmp_path / "vae-fix"))
    vae = backend.pipe.vae  # type: ignore[attr-defined]
    assert vae.config.force_upcast is False
    assert torch.equal(vae.decoder.conv_out.weight, fixed.decoder.conv_out.weight)
    assert max_diff(plain.run(item(), RecordingContext())[0], backend.run(item(), RecordingContext())[0]) > 8


def test_float16_is_resolved_to_bfloat16_for_families_that_overflow_it() -> None:
    from server.backends.weights import resolve_dtype

    assert resolve_dtype("auto", "mps", float16=False) == torch.bfloat16
    assert resolve_dtype("auto", "mps") == torch.float16
    assert resolve_dtype("auto", "cuda", float16=False) == torch.bfloat16


def test_noise_comes_from_cpu_generators_by_default_whatever_the_device() -> None:
    """``rng: "cpu"`` (the default): a model on CUDA draws its noise from CPU generators,
    seed + k for image k, so a seed gives one image on any GPU and any worker."""
    from server.backends import create_backend
    from server.config import ModelConfig, Settings

    backend = create_backend("gpu", ModelConfig(backend="sdxl", device="cuda", isolate=False), Settings())
    gens = backend.generators(item(seed=11, n=3))  # type: ignore[attr-defined]
    assert [g.device.type for g in gens] == ["cpu"] * 3 and [g.initial_seed() for g in gens] == [11, 12, 13]


@pytest.mark.parametrize("rng", ["cpu", "device"])
def test_same_seed_gives_the_same_image_across_loads(tiny_flux2_klein: Path, rng: str) -> None:
    first = load_backend("flux2_klein", model_path=str(tiny_flux2_klein), rng=rng)
    a = first.run(item(seed=5), RecordingContext())[0]
    first.unload()
    second = load_backend("flux2_klein", model_path=str(tiny_flux2_klein), rng=rng)
    assert max_diff(a, second.run(item(seed=5), RecordingContext())[0]) == 0
    assert max_diff(a, second.run(item(seed=6), RecordingContext())[0]) > 8


def test_family_defaults_for_steps_and_guidance() -> None:
    """Without recommended_steps / recommended_guidance a job gets its family's (the model cards')."""
    from server.config import ModelConfig
    from server.families import default_guidance, default_steps

    expected = {"sdxl": (30, 5.0), "qwen_edit_gguf": (40, 4.0), "z_image": (9, 0.0), "flux2_klein": (4, 1.0)}
    for backend, (steps, guidance) in expected.items():
        cfg = ModelConfig(backend=backend)
        assert (default_steps(cfg), default_guidance(cfg)) == (steps, guidance), backend
    own = ModelConfig(backend="sdxl", recommended_steps=2, recommended_guidance=1.5)
    assert (default_steps(own), default_guidance(own)) == (2, 1.5)


def test_flux2_single_file_in_the_vendors_layout_loads(tiny_flux2_klein: Path, tmp_path: Path) -> None:
    """A transformer file under Black Forest Labs' own key names (fused qkv, ``.scale``
    norms, (shift, scale) final modulation) loads to the folder's exact weights."""
    plain = tp.write_flux2_vendor_file(tiny_flux2_klein, tmp_path / "klein.safetensors")
    single = load_backend("flux2_klein", transformer_path=str(plain), base_model_path=str(tiny_flux2_klein))
    folder = load_backend("flux2_klein", model_path=str(tiny_flux2_klein))
    assert max_diff(single.run(item(), RecordingContext())[0], folder.run(item(), RecordingContext())[0]) == 0


def test_scaled_fp8_flux2_file_is_refused_with_what_to_use_instead(tiny_flux2_klein: Path, tmp_path: Path) -> None:
    """The vendor's FP8 layout (float8 weights with a ``weight_scale`` each): Diffusers'
    converter cannot apply the scales, so the load says to use the bf16 folder with fp8."""
    from safetensors import safe_open

    from server.backends.base import BackendError

    fp8 = tp.write_flux2_vendor_file(tiny_flux2_klein, tmp_path / "klein-fp8.safetensors", fp8_scaled=True)
    with safe_open(str(fp8), framework="pt") as f:
        assert f.get_tensor("double_blocks.0.img_attn.qkv.weight").dtype == torch.float8_e4m3fn
        assert "double_blocks.0.img_attn.qkv.weight_scale" in set(f.keys())
    with pytest.raises(BackendError, match=r"scaled FP8 weights .* bf16 Diffusers folder .* quantization 'fp8'"):
        load_backend("flux2_klein", transformer_path=str(fp8), base_model_path=str(tiny_flux2_klein))


def test_fp8dq_off_cuda_is_refused_at_load(tiny_flux2_klein: Path) -> None:
    """``fp8dq`` needs float8 matmuls (CUDA, Hopper): elsewhere the load says so (with
    torchao installed), or says to install torchao."""
    from server.backends.base import BackendError

    with pytest.raises(BackendError, match="torchao|need a CUDA GPU"):
        load_backend("flux2_klein", model_path=str(tiny_flux2_klein), quantization="fp8dq", device="auto")


def test_a_failed_jobs_tensors_are_dropped_before_the_cache_is_emptied(tiny_flux2_klein: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory job: ``free_memory`` (``empty_cache``) runs once the failed call's
    frames, and so its tensors, are gone, not inside the ``except`` that still holds them."""
    import gc
    import weakref

    from server.backends import diffusers_common
    from server.backends.base import BackendError

    backend = load_backend("flux2_klein", model_path=str(tiny_flux2_klein))
    seen: list[weakref.ref[torch.Tensor]] = []

    def out_of_memory(_module: object, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        seen.append(weakref.ref(kwargs["hidden_states"]))  # type: ignore[arg-type]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    alive_at_free: list[bool] = []

    def free_memory() -> None:
        gc.collect()
        alive_at_free.append(seen[0]() is not None)

    monkeypatch.setattr(diffusers_common, "free_memory", free_memory)
    hook = backend.pipe.transformer.register_forward_pre_hook(out_of_memory, with_kwargs=True)  # type: ignore[attr-defined]
    try:
        with pytest.raises(BackendError, match="out of host memory"):
            backend.run(item(), RecordingContext())
    finally:
        hook.remove()
    assert alive_at_free == [False]
    monkeypatch.undo()
    assert backend.run(item(), RecordingContext())[0].size == (64, 64)  # the model goes on


def test_fp8_quantizes_the_transformer_and_optionally_the_text_encoder(tiny_flux2_klein: Path) -> None:
    """torchao 0.18's Float8WeightOnlyConfig (no ``float8_weight_only`` any more), applied
    once the model is placed; ``quantize_text_encoder`` quantizes the Qwen3 encoder too."""
    pytest.importorskip("torchao")
    backend: Any = load_backend("flux2_klein", model_path=str(tiny_flux2_klein), quantization="fp8", quantize_text_encoder=True)
    kinds = {type(backend.pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__,
             type(backend.pipe.text_encoder.model.layers[0].mlp.up_proj.weight).__name__}  # fmt: skip
    assert kinds == {"Float8Tensor"}
    assert backend.run(item(), RecordingContext())[0].size == (64, 64)


# ----------------------------------------------------------------------------- loading straight to the device


@pytest.mark.parametrize(
    ("setting", "device", "offload", "expected"),
    [
        ("auto", "cuda", "none", "cuda"),
        ("auto", "cuda:0", "none", "cuda"),
        ("auto", "cuda:1", "none", None),  # Diffusers takes only the device type: the current device
        ("auto", "cuda", "model", None),  # offload keeps the components in host memory
        ("auto", "cuda", "sequential", None),
        ("auto", "cpu", "none", None),
        ("auto", "mps", "none", None),
        ("off", "cuda", "none", None),
        ("device", "cuda", "none", "cuda"),
    ],
)
def test_device_map_goes_straight_to_a_cuda_device_only_without_offload(setting: str, device: str, offload: str, expected: str | None) -> None:
    from server.backends.weights import device_map

    assert device_map(setting, device, offload) == expected


def test_device_map_device_on_another_cuda_index_is_a_load_error() -> None:
    from server.backends.base import BackendError
    from server.backends.weights import device_map

    with pytest.raises(BackendError, match="device_map 'auto'"):
        device_map("device", "cuda:1", "none")


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"device": "cuda", "offload": "model"}, "offload 'model'"),
        ({"device": "cuda", "offload": "sequential"}, "offload 'sequential'"),
        ({"device": "cpu"}, "runs on 'cpu'"),
    ],
)
def test_device_map_device_with_offload_or_off_cuda_is_refused_in_the_settings(extra: dict[str, str], words: str) -> None:
    from server.config import ConfigError, build_settings

    model = {"backend": "sdxl", "model_path": "/models/sdxl", "device_map": "device", **extra}
    with pytest.raises(ConfigError, match="models.x.device_map") as info:
        build_settings({"models": {"x": model}})
    assert words in str(info.value)
    build_settings({"models": {"x": {**model, "device_map": "auto"}}})  # the default loads either way


class RecordingPipeline:
    """A stand-in pipeline class (it has ``components``) that records what easel asks
    ``from_pretrained`` for: the keyword arguments of a CUDA load, on a CPU machine."""

    components: dict[str, Any] = {}
    asked: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, source: str, **kwargs: Any) -> str:
        cls.asked = kwargs
        return source


@pytest.mark.parametrize(("extra", "mapped"), [({}, "cuda"), ({"offload": "model"}, None), ({"device_map": "off"}, None)])
def test_a_cuda_model_asks_diffusers_for_the_device_map(tiny_sdxl: Path, extra: dict[str, str], mapped: str | None) -> None:
    from server.backends import create_backend
    from server.config import ModelConfig, Settings

    backend: Any = create_backend("x", ModelConfig(backend="sdxl", model_path=str(tiny_sdxl), device="cuda", **extra), Settings())  # type: ignore[arg-type]
    backend.from_pretrained(RecordingPipeline, str(tiny_sdxl))
    assert RecordingPipeline.asked.get("device_map") == mapped
    assert RecordingPipeline.asked["dtype"] == torch.bfloat16


def test_on_the_cpu_a_pipeline_loads_as_before_without_a_device_map(tiny_sdxl: Path) -> None:
    backend: Any = load_backend("sdxl", model_path=str(tiny_sdxl), device="cpu")
    try:
        assert backend.pipe.hf_device_map is None
        assert backend.pipe.unet.device.type == "cpu"
    finally:
        backend.unload()
