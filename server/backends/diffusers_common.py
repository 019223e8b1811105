"""What every Diffusers backend shares: device/dtype resolution, finding weights,
placement (offload, VAE tiling/slicing), seeded generators, the step callback with
cancellation and previews, per-request LoRA, OOM mapping and unloading.

A concrete backend subclasses ``DiffusersBackend`` and says only what differs: how
to build its pipeline, which keyword arguments a ``WorkItem`` becomes, and how to
turn intermediate latents into an image for previews.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from ..families import default_guidance, family
from .base import BackendError, Capabilities, StepContext, WorkItem, free_memory, model_capabilities, out_of_memory
from .batched import run_batch as batched_call
from .inputs import img2img_inputs
from .latent_preview import Factors, LatentRGB, fit_latent_rgb
from .lora import applied_loras
from .memory import peak_mib
from .memory import release_cache as release_cached_blocks
from .prompt_cache import PromptCache
from .sampling import scheduler_for
from .speed import apply_speed_knobs, reset_attention_backend, use_step_cache
from .weights import device_map, resolve_device, resolve_dtype, resolve_source

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import ModelConfig, Settings

log = logging.getLogger(__name__)

def shared_init_kwargs(pipe: Any, cls: Any) -> dict[str, Any]:
    """What ``cls(...)`` takes from the loaded ``pipe``: its components, and the
    settings it was built with that ``cls`` also accepts (``is_distilled``, ...)."""
    wanted = inspect.signature(cls.__init__).parameters
    components = pipe.components
    settings = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in components}
    return {k: v for k, v in {**settings, **components}.items() if k in wanted}


def released(exc: BaseException, message: str) -> BackendError:
    """A ``BackendError(message)`` caused by ``exc`` without its traceback: the
    traceback holds the failed call's frames, whose tensors ``empty_cache`` cannot give
    back while anything refers to them."""
    error = BackendError(message)
    error.__cause__ = exc.with_traceback(None)
    exc.__context__ = None
    return error


def memory_of(device: str) -> str:
    """What runs out on ``device``, for a message."""
    return "host memory (RAM)" if device == "cpu" else "GPU memory"


def step_callback(
    ctx: StepContext,
    preview: Callable[[Any, torch.Tensor], Image.Image | None],
    calls: int = 1,
    call: int = 0,
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A ``callback_on_step_end`` that reports progress (over ``calls`` pipeline calls,
    this being call number ``call``), honours cancellation (``JobCancelled`` from
    ``ctx.step`` propagates and stops the pipeline) and sends previews."""

    def callback(pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        per_call = int(pipe._num_timesteps)  # the real count (img2img runs fewer steps)
        done = call * per_call + i + 1
        ctx.step(done, calls * per_call)
        if ctx.wants_preview(done) and "latents" in kwargs:
            with torch.no_grad():
                image = preview(pipe, kwargs["latents"])
            if image is not None:
                ctx.preview(image)
        return kwargs

    return callback


class DiffusersBackend:
    """Base class of the Diffusers backends (see module docstring)."""

    isolated = False
    supports_previews: ClassVar[bool] = True
    latent_rgb: ClassVar[Factors | None] = None  # published latent -> RGB factors (latent_preview.py)

    def __init__(self, name: str, cfg: ModelConfig, settings: Settings) -> None:
        self.name = name
        self.cfg = cfg
        self.settings = settings
        self.capabilities: Capabilities = model_capabilities(cfg)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.torch_dtype, self.device, family(cfg).float16)
        self.pipe: Any = None
        self._variants: dict[str, Any] = {}  # e.g. "img2img" -> pipeline sharing components
        self.rgb: LatentRGB | None = None  # the preview projection, set at load
        self.prompt_cache = PromptCache(cfg.prompt_cache_size)  # text-encoder outputs of recent prompts

    # ----------------------------------------------------------------- hooks

    def _build_pipeline(self) -> Any:
        """Construct the (still CPU-resident) pipeline, usually with ``self.from_pretrained``."""
        raise NotImplementedError

    def _call_kwargs(self, item: WorkItem) -> tuple[Any, dict[str, Any]]:
        """The pipeline to call for ``item`` and its task-specific keyword arguments."""
        raise NotImplementedError

    def _spatial_latents(self, pipe: Any, latents: torch.Tensor, item: WorkItem) -> torch.Tensor | None:
        """The pipeline's intermediate latents as the (B, C, h, w) grid the transformer
        sees (unpacked, still scaled / normalized): what previews project. None: no previews."""
        return None

    def _decode_spatial(self, pipe: Any, z: torch.Tensor) -> torch.Tensor:
        """VAE decode of (B, C, h, w) latents as ``_spatial_latents`` gives them, to an
        image tensor in [-1, 1] (B, 3, H, W): only to fit the preview projection at load."""
        raise NotImplementedError

    def _latent_channels(self, pipe: Any) -> int:
        """C of ``_spatial_latents``: the VAE's latent channels."""
        config = pipe.vae.config
        return int(getattr(config, "latent_channels", None) or config.z_dim)

    # ----------------------------------------------------------------- lifecycle

    def from_pretrained(self, pipeline_cls: Any, path: str | None, key: str = "model_path", **kwargs: Any) -> Any:
        source, extra = resolve_source(path, key, self.name)
        if (mapped := device_map(self.cfg.device_map, self.device, self.cfg.offload)) is not None and hasattr(pipeline_cls, "components"):
            extra["device_map"] = mapped  # a pipeline: each component read straight onto the device
        try:
            return pipeline_cls.from_pretrained(source, dtype=self.dtype, **extra, **kwargs)
        except (OSError, ValueError) as exc:
            raise BackendError(
                f"could not load {pipeline_cls.__name__} for model {self.name!r} from {source!r}: {exc}. "
                "Check that the folder is a complete Diffusers model (model_index.json and its component folders)"
            ) from exc

    def load(self) -> None:
        if self.pipe is not None:
            return
        failure: BackendError | None = None
        try:
            pipe = self._place(self._build_pipeline())
            self._placed(pipe)
            self.pipe = pipe
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            advice = "set offload to 'model' (or 'sequential'), " if self.device != "cpu" else ""
            failure = released(exc, f"out of {memory_of(self.device)} loading model {self.name!r}; {advice}"
                                    "use a quantized transformer, or unload other models first")  # fmt: skip
        if failure is not None:  # out of the except: the failed load's tensors are dropped now
            free_memory()
            raise failure
        self.rgb = self._latent_rgb()
        log.info("model %s loaded on %s (%s, offload=%s)", self.name, self.device, self.dtype, self.cfg.offload)

    def _latent_rgb(self) -> LatentRGB | None:
        """The preview projection: the family's published factors when the VAE's latent
        channels match them, else fitted to this VAE now (one small decode); None (no
        previews) when the backend has no ``_spatial_latents`` or the fit fails."""
        if type(self)._spatial_latents is DiffusersBackend._spatial_latents:
            return None
        try:
            channels = self._latent_channels(self.pipe)
            if self.latent_rgb is not None and len(self.latent_rgb[0]) == channels:
                return LatentRGB.published(self.latent_rgb)
            vae = self.pipe.vae
            device = str(getattr(self.pipe, "_execution_device", None) or self.device)
            rgb = fit_latent_rgb(lambda z: self._decode_spatial(self.pipe, z), channels, device, vae.dtype)
        except Exception as exc:  # previews are a nicety: the model still serves
            log.warning("model %s: no previews (fitting the latent projection failed: %s)", self.name, exc)
            return None
        log.info("model %s: preview projection fitted to its VAE (%d latent channels, no published factors)", self.name, channels)
        return rgb

    def _place(self, pipe: Any) -> Any:
        """Move to the device (or install offload hooks) and apply VAE options."""
        pipe.set_progress_bar_config(disable=True)
        if self.cfg.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self.cfg.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        vae: Any = getattr(pipe, "vae", None)
        if self.cfg.vae_tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        if self.cfg.vae_slicing and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()
        return pipe

    def _placed(self, pipe: Any) -> None:
        """What runs once the loaded pipeline is on its device: quantization on the
        device (FLUX.2-klein), the speed knobs (``speed.py``)."""
        self.prompt_cache.wrap(pipe)
        apply_speed_knobs(self.name, pipe, self.cfg)

    def variant(self, key: str, pipeline_cls: Any) -> Any:
        """A pipeline of another class sharing the loaded components (``from_pipe``)."""
        if key not in self._variants:
            pipe = pipeline_cls.from_pipe(self.pipe)
            if self.cfg.offload != "none":  # from_pipe drops the offload hooks
                pipe = self._place(pipe)
            pipe.set_progress_bar_config(disable=True)
            self.prompt_cache.wrap(pipe)
            self._variants[key] = pipe
        return self._variants[key]

    def unload(self) -> None:
        self._variants.clear()
        self.prompt_cache.clear()
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            if hasattr(pipe, "remove_all_hooks"):
                pipe.remove_all_hooks()
            reset_attention_backend(pipe, self.cfg.attention_backend)
            del pipe
        free_memory()

    def cost_prior(self, fit: str) -> dict[str, float] | None:
        return None

    # ----------------------------------------------------------------- tokens

    def _prompt_text(self, tokenizer: Any, prompt: str) -> str:
        """The text the pipeline tokenizes for ``prompt`` (a chat template for Qwen-based encoders)."""
        return prompt

    def _token_limit(self, tokenizer: Any) -> int | None:
        """The most tokens the pipeline keeps: its ``max_sequence_length`` default, else
        the tokenizer's ``model_max_length`` (CLIP: 77); None when it cuts nothing."""
        import inspect

        param = inspect.signature(type(self.pipe).__call__).parameters.get("max_sequence_length")
        if param is not None and isinstance(param.default, int):
            return param.default
        limit = getattr(tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and limit < 1_000_000 else None

    def count_tokens(self, prompt: str) -> tuple[int, int | None]:
        """(tokens, limit): the prompt as the pipeline's tokenizer encodes it (special and
        template tokens included), and the most tokens its text encoder takes."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            return len(prompt.split()), None
        ids = tokenizer(self._prompt_text(tokenizer, prompt), truncation=False, verbose=False)["input_ids"]
        return len(ids), self._token_limit(tokenizer)

    def after_job(self, release_cache: bool) -> float | None:
        """Cached blocks back to the device when another model shares it; the peak this
        process held on a CUDA device (server/backends/memory.py)."""
        device = self.device if self.device != "cuda" else "cuda:0"
        if release_cache:
            release_cached_blocks(device)
        return peak_mib(device)

    # ----------------------------------------------------------------- running

    def generators(self, item: WorkItem) -> list[torch.Generator]:
        """One generator per image: image k uses seed + k (reproducible one by one).
        On the CPU unless ``rng: "device"``: CUDA's generator draws other numbers per
        GPU generation and library version; the CPU's are the same everywhere (the
        pipelines draw the noise there and move it to the device)."""
        device = "cpu" if self.cfg.rng == "cpu" or self.device.startswith("mps") else self.device
        return [torch.Generator(device).manual_seed(item.spec.seed + k) for k in range(item.spec.n)]

    def guidance(self, item: WorkItem) -> float:
        return item.spec.guidance if item.spec.guidance is not None else default_guidance(self.cfg)

    def strength(self, item: WorkItem) -> float:
        return item.spec.strength if item.spec.strength is not None else self.cfg.default_strength

    def img2img_kwargs(self, item: WorkItem) -> dict[str, Any] | None:
        """``image`` and ``strength`` for an img2img call when ``item`` has a source, else
        None (``inputs.img2img_inputs``)."""
        return img2img_inputs(item, self.strength(item))

    def inpaint_variant(self, class_name: str) -> Any:
        """The family's Diffusers inpaint pipeline sharing the loaded components."""
        import diffusers

        cls = getattr(diffusers, class_name, None)
        if cls is None:
            raise BackendError(
                f"model {self.name!r} cannot use masks: this Diffusers ({diffusers.__version__}) has no {class_name}; "
                "upgrade diffusers or drop mask"
            )
        if "inpaint" not in self._variants:
            # as from_pipe, but without its dtype cast, which a GGUF-quantized transformer refuses;
            # the pipeline's own settings (FLUX.2-klein's is_distilled: no CFG) carry over too
            pipe = cls(**shared_init_kwargs(self.pipe, cls))
            if self.cfg.offload != "none":
                pipe = self._place(pipe)
            pipe.set_progress_bar_config(disable=True)
            self.prompt_cache.wrap(pipe)
            self._variants["inpaint"] = pipe
        return self._variants["inpaint"]

    def _preview(self, item: WorkItem) -> Callable[[Any, torch.Tensor], Image.Image | None]:
        """The first image's latents projected to RGB (``latent_preview``), at
        ``preview_size``: a few small tensor operations, never a VAE decode."""

        def project(pipe: Any, latents: torch.Tensor) -> Image.Image | None:
            rgb = self.rgb
            z = self._spatial_latents(pipe, latents[:1], item) if rgb is not None else None
            if rgb is None or z is None or z.shape[1] != rgb.channels:
                return None
            return rgb.project(z[0], item.spec.width, item.spec.height)

        return project

    def _batchable(self, item: WorkItem) -> bool:
        """False when a batched call would not give image k the pixels of seed + k
        alone (then images are made one call each)."""
        return True

    def run(self, item: WorkItem, ctx: StepContext) -> list[Image.Image]:
        if self.pipe is None:
            raise BackendError(f"model {self.name!r} is not loaded; load it first")
        if item.task not in self.capabilities.tasks:
            raise BackendError(
                f"model {self.name!r} does not support {item.task!r} (it supports: {', '.join(self.capabilities.tasks)})"
            )
        self.prompt_cache.scope = tuple((lora.name, lora.scale) for lora in item.spec.loras)  # adapters may change the encoder
        pipe, kwargs = self._call_kwargs(item)
        kwargs.update(
            prompt=item.spec.prompt,
            num_inference_steps=item.spec.steps,
            callback_on_step_end_tensor_inputs=["latents"],
            output_type="pil",
        )
        generators = self.generators(item)
        batches = [generators] if self._batchable(item) else [[g] for g in generators]
        preview = self._preview(item)
        images: list[Image.Image] = []
        failure: BackendError | None = None
        use_step_cache(self.pipe, self.cfg, item.spec.cache)
        try:
            with (applied_loras(self.pipe, item.spec.loras, self.cfg.lora_dir, self.name, self.cfg.lora_cache_size, self.cfg.compile == "regional"),
                  scheduler_for(pipe, self.cfg.backend, item.spec.sampler, item.spec.scheduler)):  # fmt: skip
                for k, gens in enumerate(batches):
                    callback = step_callback(ctx, preview, len(batches), k)
                    out = pipe(generator=gens, num_images_per_prompt=len(gens), callback_on_step_end=callback, **kwargs)
                    images.extend(out.images)
        except Exception as exc:
            pipe.maybe_free_model_hooks()  # a stopped call skips this (offloaded models stay on the GPU)
            if not out_of_memory(exc):
                raise
            advice = ", or set offload to 'model' for this model" if self.device != "cpu" else ""
            failure = released(exc, f"out of {memory_of(self.device)} running model {self.name!r} at {item.spec.width}x{item.spec.height} "
                                    f"with n={item.spec.n} and {len(item.images)} reference image(s); try a smaller size, fewer "
                                    f"images or references{advice}")  # fmt: skip
        if failure is not None:  # out of the except, whose traceback held the pipeline's frames and their tensors
            free_memory()  # now empty_cache can give them back
            raise failure
        return images[: item.spec.n]

    def run_batch(self, items: list[WorkItem], ctx: StepContext) -> list[list[Image.Image]]:
        """Several compatible items in one pipeline call (``backends/batched.py``)."""
        if len(items) == 1:
            return [self.run(items[0], ctx)]
        failure: BackendError | None = None
        try:
            return batched_call(self, items, ctx)
        except Exception as exc:
            if self.pipe is not None:
                self.pipe.maybe_free_model_hooks()  # a stopped call skips this (offloaded models stay on the GPU)
            if not out_of_memory(exc):
                raise
            advice = ", or set offload to 'model' for this model" if self.device != "cpu" else ""
            first = items[0]
            failure = released(exc, f"out of {memory_of(self.device)} running model {self.name!r} at {first.spec.width}x{first.spec.height} with "
                                    f"{sum(it.spec.n for it in items)} images of {len(items)} jobs in one call; try a smaller target_inflight{advice}")  # fmt: skip
        free_memory()  # out of the except, whose traceback held the pipeline's frames and their tensors
        raise failure

    def _rows_kwargs(self, kwargs: dict[str, Any], negatives: list[str | None]) -> dict[str, Any]:
        """A batched call's keyword arguments, one negative prompt per row (a batch
        has them all, or none: ``jobs.batch_key``)."""
        if kwargs.get("negative_prompt") is not None:
            kwargs["negative_prompt"] = [n or "" for n in negatives]
        return kwargs
