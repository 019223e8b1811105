"""The Diffusers backends, run for real on tiny random-weight pipelines (CPU, 64 px,
2 steps) loaded through the same ``from_pretrained`` path real weights take."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from server.backends import create_backend
from server.backends.base import BackendError, JobCancelled
from server.config import ModelConfig, Settings
from server.features import FEATURES, FITS
from server.forecast import prior_vector
from server.items import Lora
from tests.backend_helpers import RecordingContext, item, load_backend, max_diff, reference

if TYPE_CHECKING:
    from collections.abc import Iterator

    from server.backends.base import Backend, WorkItem

pytest_plugins = ["tests.backend_fixtures"]
pytestmark = [pytest.mark.usefixtures("tiny_runtime"), pytest.mark.timeout(120)]

ALL = ("flux2_klein", "sdxl", "z_image", "qwen_edit_gguf")
WITH_LORA = ("flux2_klein", "sdxl", "z_image")


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs: dict[str, Path], lora_dirs: dict[str, Path]) -> Iterator[dict[str, Backend]]:
    backends = {
        b: load_backend(b, model_path=str(tiny_model_dirs[b]), lora_dir=str(lora_dirs[b]) if b in lora_dirs else None)
        for b in ALL
    }
    yield backends
    for backend in backends.values():
        backend.unload()


def basic(backend: str, **kw: object) -> WorkItem:
    """The backend's main task: an edit with one reference for the edit-only model."""
    if backend == "qwen_edit_gguf":
        return item("edit", images=[reference()], **kw)
    return item("generate", **kw)


def run(backend: Backend, work: WorkItem, ctx: RecordingContext | None = None) -> list:
    return backend.run(work, ctx or RecordingContext())


# ----------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("name", ALL)
def test_outputs_have_requested_size_and_count(loaded: dict[str, Backend], name: str) -> None:
    images = run(loaded[name], basic(name, width=64, height=48, n=2))
    assert [im.size for im in images] == [(64, 48), (64, 48)]


@pytest.mark.parametrize("name", ALL)
def test_same_seed_gives_identical_pixels(loaded: dict[str, Backend], name: str) -> None:
    a = run(loaded[name], basic(name, seed=7))[0]
    b = run(loaded[name], basic(name, seed=7))[0]
    assert max_diff(a, b) == 0


@pytest.mark.parametrize("name", ALL)
def test_different_seed_gives_different_pixels(loaded: dict[str, Backend], name: str) -> None:
    a = run(loaded[name], basic(name, seed=7))[0]
    b = run(loaded[name], basic(name, seed=8))[0]
    assert max_diff(a, b) > 8


@pytest.mark.parametrize("name", ALL)
def test_image_k_of_a_batch_matches_seed_plus_k_alone(loaded: dict[str, Backend], name: str) -> None:
    batch = run(loaded[name], basic(name, seed=3, n=2))
    alone = run(loaded[name], basic(name, seed=4))[0]
    assert max_diff(batch[1], alone) <= 2  # batched matmuls may round differently on CPU


@pytest.mark.parametrize("name", ALL)
def test_progress_reports_every_step(loaded: dict[str, Backend], name: str) -> None:
    ctx = RecordingContext()
    run(loaded[name], basic(name, steps=3), ctx)
    assert ctx.steps == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("name", ALL)
def test_previews_are_decoded_at_output_size(loaded: dict[str, Backend], name: str) -> None:
    ctx = RecordingContext(preview_every=1)
    run(loaded[name], basic(name, width=64, height=48), ctx)
    assert [p.size for p in ctx.previews] == [(64, 48), (64, 48)]


@pytest.mark.parametrize("name", ALL)
def test_previews_are_a_latent_projection_not_a_vae_decode(loaded: dict[str, Backend], name: str) -> None:
    """Previews project the latents linearly (published factors where the VAE's latent
    channels match them, fitted at load otherwise): no VAE decoder call, at most 256 px a side."""
    backend = loaded[name]
    rgb = backend.rgb  # type: ignore[attr-defined]
    assert rgb is not None and rgb.fitted is (name in ("flux2_klein", "qwen_edit_gguf"))  # tiny VAEs: 4 channels
    calls: list[int] = []
    hook = backend.pipe.vae.decoder.register_forward_hook(lambda *_: calls.append(1))  # type: ignore[attr-defined]
    try:
        plain = RecordingContext()
        run(backend, basic(name, width=288, height=160), plain)
        decodes = len(calls)
        ctx = RecordingContext(preview_every=1)
        run(backend, basic(name, width=288, height=160), ctx)
    finally:
        hook.remove()
    assert decodes >= 1 and len(calls) == 2 * decodes  # the final images only: previews add no decode
    assert [p.size for p in ctx.previews] == [(256, 142), (256, 142)] and all(p.mode == "RGB" for p in ctx.previews)


@pytest.mark.parametrize("name", ALL)
def test_cancel_stops_the_pipeline_at_the_next_step(loaded: dict[str, Backend], name: str) -> None:
    ctx = RecordingContext(cancel_after=1)
    with pytest.raises(JobCancelled):
        run(loaded[name], basic(name, steps=4), ctx)
    assert ctx.steps == [(1, 4)]
    assert len(run(loaded[name], basic(name))) == 1  # the model keeps working


def check_prior(backend: Backend) -> int:
    """Every fit's prior is None or known terms of non-negative seconds; the count of priors given."""
    given = 0
    for fit in FITS:
        prior = backend.cost_prior(fit)
        if prior is None:
            continue
        given += 1
        vector = prior_vector(prior)  # unknown terms raise
        assert vector.shape == (len(FEATURES),) and (vector >= 0).all(), (fit, prior)
    return given


@pytest.mark.parametrize("name", ALL)
def test_cost_prior_is_none_or_one_coefficient_per_feature(loaded: dict[str, Backend], name: str) -> None:
    check_prior(loaded[name])


def test_the_stubs_cost_prior_is_checked_term_by_term() -> None:
    """The stub gives a prior for every fit, so ``check_prior`` really looks at one."""
    stub = create_backend("stub", ModelConfig(backend="stub", simulate_step_seconds=1.0), Settings())
    assert check_prior(stub) == len(FITS)


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("name", WITH_LORA)
def test_lora_changes_pixels_and_scale_zero_gives_base(loaded: dict[str, Backend], name: str) -> None:
    base = run(loaded[name], basic(name))[0]
    styled = run(loaded[name], basic(name, loras=[Lora("style", 1.0)]))[0]
    zero = run(loaded[name], basic(name, loras=[Lora("style", 0.0)]))[0]
    assert max_diff(base, styled) > 8
    assert max_diff(base, zero) == 0


@pytest.mark.parametrize("name", WITH_LORA)
def test_job_after_a_lora_job_runs_on_base_weights(loaded: dict[str, Backend], name: str) -> None:
    base = run(loaded[name], basic(name))[0]
    run(loaded[name], basic(name, loras=[Lora("style", 1.0)]))
    assert max_diff(base, run(loaded[name], basic(name))[0]) == 0


@pytest.mark.parametrize(
    ("lora", "message"),
    [("../style", "not a name inside"), ("/etc/passwd", "not a name inside"), ("nope", "not found")],
)
def test_bad_lora_names_are_refused(loaded: dict[str, Backend], lora: str, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        run(loaded["z_image"], basic("z_image", loras=[Lora(lora)]))
    assert len(run(loaded["z_image"], basic("z_image"))) == 1


def test_lora_without_lora_dir_is_refused(tiny_z_image: Path) -> None:
    backend = load_backend("z_image", model_path=str(tiny_z_image))
    with pytest.raises(BackendError, match="no lora_dir"):
        run(backend, basic("z_image", loras=[Lora("style")]))


def test_lora_for_another_model_family_is_a_clear_error(loaded: dict[str, Backend], lora_dirs: dict[str, Path]) -> None:
    backend = loaded["z_image"]
    backend.cfg.lora_dir = str(lora_dirs["sdxl"])  # type: ignore[attr-defined]
    try:
        with pytest.raises(BackendError, match="another model family"):
            run(backend, basic("z_image", loras=[Lora("style")]))
    finally:
        backend.cfg.lora_dir = str(lora_dirs["z_image"])  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- edits and img2img


def test_flux2_edit_with_two_references(loaded: dict[str, Backend]) -> None:
    refs = [reference(96, 64, seed=1), reference(64, 80, seed=2)]
    one = run(loaded["flux2_klein"], item("edit", images=refs[:1]))[0]
    two = run(loaded["flux2_klein"], item("edit", images=refs, width=80, height=64))[0]
    assert two.size == (80, 64)
    assert max_diff(one.resize((80, 64)), two) > 0


@pytest.mark.parametrize("name", ("flux2_klein", "qwen_edit_gguf", "sdxl"))
def test_reference_smaller_than_64px_is_refused(loaded: dict[str, Backend], name: str) -> None:
    with pytest.raises(BackendError, match="at least 64 px"):
        run(loaded[name], item("edit", images=[reference(63, 100)], strength=0.6))


def test_too_many_references_are_refused(loaded: dict[str, Backend]) -> None:
    with pytest.raises(BackendError, match="at most 4"):
        run(loaded["flux2_klein"], item("edit", images=[reference()] * 5))


def test_edit_only_model_refuses_text_to_image(loaded: dict[str, Backend]) -> None:
    with pytest.raises(BackendError, match="does not support 'generate'"):
        run(loaded["qwen_edit_gguf"], item("generate"))


def test_a_masked_qwen_edit_runs_at_its_own_size_without_changing_the_stored_item(loaded: dict[str, Backend]) -> None:
    """QwenImageEditInpaint runs at its own size (here 64x64 of area, the 96x64's
    aspect): the work item gets a spec of that size for its previews, while the job's
    stored item (the same ``items.Item`` the record holds) keeps the size asked."""
    from PIL import Image

    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (16, 16, 64, 48))
    work = item("edit", images=[reference(96, 64)], mask=mask, width=96, height=64)
    stored = work.spec
    run(loaded["qwen_edit_gguf"], work)
    assert (stored.width, stored.height) == (96, 64)
    assert work.spec is not stored and (work.spec.width, work.spec.height) != (96, 64)


@pytest.mark.parametrize("name", ("sdxl", "z_image"))
def test_img2img_follows_the_init_image_and_strength(loaded: dict[str, Backend], name: str) -> None:
    src = reference(128, 96)
    ctx = RecordingContext()
    weak = run(loaded[name], item(init_image=src, strength=0.5, steps=4), ctx)[0]
    strong = run(loaded[name], item(init_image=src, strength=1.0, steps=4))[0]
    assert weak.size == (64, 64)
    assert ctx.steps[-1][0] == ctx.steps[-1][1] < 4 or name == "z_image"
    assert max_diff(weak, strong) > 8


@pytest.mark.parametrize("name", ("sdxl", "z_image"))
def test_edit_uses_the_first_reference_as_init_image(loaded: dict[str, Backend], name: str) -> None:
    src = reference(64, 64, seed=5)
    edited = run(loaded[name], item("edit", images=[src], strength=0.6))[0]
    img2img = run(loaded[name], item(init_image=src, strength=0.6))[0]
    assert max_diff(edited, img2img) == 0


def test_strength_leaving_no_step_is_explained(loaded: dict[str, Backend]) -> None:
    with pytest.raises(BackendError, match="at least 3 steps"):
        run(loaded["sdxl"], item(init_image=reference(), strength=0.35, steps=2))


# ----------------------------------------------------------------------------- single files


def test_qwen_loads_a_gguf_transformer(tiny_qwen_edit: Path, qwen_gguf: Path) -> None:
    backend = load_backend("qwen_edit_gguf", transformer_path=str(qwen_gguf), base_model_path=str(tiny_qwen_edit))
    params = {type(p).__name__ for p in backend.pipe.transformer.parameters()}  # type: ignore[attr-defined]
    assert "GGUFParameter" in params
    assert run(backend, basic("qwen_edit_gguf"))[0].size == (64, 64)


def test_flux2_loads_an_fp8_single_file_transformer(tiny_flux2_klein: Path, tmp_path: Path) -> None:
    from tests.tiny_pipelines import write_transformer_single_file

    fp8 = write_transformer_single_file(tiny_flux2_klein, tmp_path / "klein-fp8.safetensors", fp8=True)
    backend = load_backend("flux2_klein", transformer_path=str(fp8), base_model_path=str(tiny_flux2_klein))
    assert run(backend, item())[0].size == (64, 64)


def test_fp8_quantization_without_torchao_says_how_to_fix(tiny_flux2_klein: Path) -> None:
    pytest.importorskip("diffusers")
    try:
        import torchao  # noqa: F401

        pytest.skip("torchao is installed")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="pip install torchao"):
        load_backend("flux2_klein", model_path=str(tiny_flux2_klein), quantization="fp8")


# ----------------------------------------------------------------------------- loading and unloading


def test_missing_model_path_is_a_clear_load_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="does not exist"):
        load_backend("sdxl", model_path=str(tmp_path / "nowhere" / "sdxl"))


def test_repo_id_is_tried_on_the_hub_and_fails_clearly_offline() -> None:
    with pytest.raises(BackendError, match="could not load StableDiffusionXLPipeline"):
        load_backend("sdxl", model_path="easel-test/does-not-exist")


def test_single_file_transformer_needs_base_model_path(qwen_gguf: Path) -> None:
    with pytest.raises(BackendError, match="needs base_model_path"):
        load_backend("qwen_edit_gguf", transformer_path=str(qwen_gguf))


def test_unload_releases_the_pipeline_and_reload_works(tiny_z_image: Path) -> None:
    backend = load_backend("z_image", model_path=str(tiny_z_image))
    before = run(backend, item())[0]
    backend.unload()
    assert backend.pipe is None  # type: ignore[attr-defined]
    with pytest.raises(BackendError, match="not loaded"):
        run(backend, item())
    backend.load()
    assert max_diff(before, run(backend, item())[0]) == 0
