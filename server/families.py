"""Model families: everything easel knows about a backend key, in one place.

A family is what ``models.NAME.backend`` names.  Its record says what its models do
by default, what they support and how they run; config validation, capabilities,
the CLI's ``--model NAME=PATH``, residency, training and upscaling all read it from
here.  Adding a family is its backend module (``server/backends/<module>.py``, the
class ``implementation`` names) and one ``Family`` below.  Nothing here imports the
backend: a server with only the stub never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ModelConfig


# what every Diffusers family imports: the packages of easel's [diffusers] extra
DIFFUSERS_EXTRA = ("torch", "diffusers", "transformers", "accelerate", "safetensors")


@dataclass(frozen=True)
class Family:
    key: str  # models.NAME.backend
    implementation: str  # "module:Class" under server.backends, imported when a model of it loads
    tasks: tuple[str, ...]  # what its models do unless models.NAME.tasks says
    pipelines: tuple[str, ...] = ()  # Diffusers pipeline classes (model_index.json) it serves: the CLI's --model NAME=PATH
    inpaint: bool = False  # masked edits and outpainting (an inpaint pipeline)
    trainable: str | None = None  # LoRA training: the /v1/training/<endpoint> name of its trainer
    quantizes: bool = False  # models.NAME.quantization other than "none"
    in_process: bool = False  # runs in the server's process by default (models.NAME.isolate: null)
    isolatable: bool = True  # may run in its own process (an upscaler is called image by image: never)
    steps: int = 4  # denoising steps when neither the request nor models.NAME.recommended_steps says
    guidance: float = 0.0  # guidance when neither the request nor models.NAME.recommended_guidance says
    float16: bool = True  # runs right in float16 (False: activations overflow to black images; torch_dtype float16 is refused)
    vae_path: bool = False  # models.NAME.vae_path: a VAE folder loaded in place of the pipeline's (SDXL's fp16-fixed VAE)
    # models.NAME.step_cache: its transformer takes Diffusers' first-block cache (FLUX.2's does not: in Diffusers
    # 0.42.1 the cache fails on its single-stream blocks, TypeError Tensor - list in first_block_cache.py)
    step_cache: bool = False
    simulated: bool = False  # sizes and costs come from the config's simulate_* keys (the stub)
    batches: bool = False  # several jobs' generates may share one pipeline call (prompt and generator lists)
    sampling: str = ""  # the samplers it runs (server/samplers.py TABLES): epsilon (UNet), flow (flow matching), "": its own only
    needs: tuple[str, ...] = DIFFUSERS_EXTRA  # packages it imports: a model of it on an install without them fails in one line


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family("stub", "stub:StubBackend", ("generate", "edit"), inpaint=True, in_process=True, simulated=True, batches=True, needs=(),
               sampling="epsilon"),
        # steps and guidance: the model cards' (FLUX.2-klein 4B/9B, distilled: 4 steps, guidance 1;
        # SDXL base: ~30 steps (Diffusers' default is 50), guidance 5; Z-Image-Turbo: 9 steps
        # (Diffusers' example 8), guidance 0; Qwen-Image-Edit-2509/2511: 40 steps, true_cfg_scale 4)
        Family(
            "flux2_klein", "flux2_klein:Flux2KleinBackend", ("generate", "edit"), ("Flux2KleinPipeline",),
            inpaint=True, trainable="flux-lora", quantizes=True, steps=4, guidance=1.0, float16=False, batches=True, sampling="flow",
        ),
        Family(
            "sdxl", "sdxl:SDXLBackend", ("generate", "edit"), ("StableDiffusionXLPipeline",), inpaint=True,
            steps=30, guidance=5.0, vae_path=True, batches=True, sampling="epsilon",
        ),
        Family(
            "z_image", "z_image:ZImageBackend", ("generate", "edit"), ("ZImagePipeline",), inpaint=True,
            trainable="z-image-lora", steps=9, guidance=0.0, float16=False, batches=True, sampling="flow",
        ),
        Family(
            "qwen_edit_gguf", "qwen_edit_gguf:QwenEditGGUFBackend", ("edit",), ("QwenImageEditPlusPipeline",),
            inpaint=True, steps=40, guidance=4.0, float16=False, step_cache=True, sampling="flow",
        ),
        Family(
            "upscale_esrgan", "upscale:UpscaleBackend", ("upscale",), in_process=True, isolatable=False, steps=1,
            needs=("torch", "spandrel", "safetensors"),
        ),
    )
}  # fmt: skip
UPSCALERS = tuple(k for k, f in FAMILIES.items() if f.tasks == ("upscale",))
TRAINABLE = tuple(k for k, f in FAMILIES.items() if f.trainable)


def family(cfg: ModelConfig) -> Family:
    return FAMILIES[cfg.backend]


def default_steps(cfg: ModelConfig) -> int:
    """A job's steps when the request does not say: the model's, else its family's."""
    return cfg.recommended_steps or FAMILIES[cfg.backend].steps


def default_guidance(cfg: ModelConfig) -> float:
    """A job's guidance when the request does not say: the model's, else its family's."""
    return cfg.recommended_guidance if cfg.recommended_guidance is not None else FAMILIES[cfg.backend].guidance


def runs_isolated(cfg: ModelConfig) -> bool:
    """Whether the model runs in its own process (``server/worker/process.py``):
    ``models.NAME.isolate``, by default every family but the stub and the upscaler.
    A model that runs torch in the server's process shares the GIL with the event
    loop: each request the server handles meanwhile holds up the model's Python (a GPU
    pipeline waits for its next kernel launch), and unloading gives back less memory."""
    return cfg.isolate if cfg.isolate is not None else not FAMILIES[cfg.backend].in_process
