"""The LoRA training run: the worker's training step (``worker.execute.train``), on the
model's worker thread, on the loaded pipeline's own components.

1. Cache: every image is resized/cropped to its training size and encoded to
   latents once; every distinct caption is encoded once.
2. Train: peft LoRA layers on the transformer (base weights frozen), AdamW,
   flow-matching loss ``|v(x_t, σ) - (noise - x0)|²`` with ``x_t = (1-σ) x0 + σ noise``
   and σ logit-normal, shifted like the pipeline's scheduler.  Progress and loss go
   to the job status; a checkpoint is saved every ``save_every`` steps.
3. Always: the adapter is removed from the live transformer, so the model goes on
   serving base weights and the saved adapter is usable as ``loras: [{name}]``.

Stopping the job saves a checkpoint of the steps done; an error keeps the
checkpoints written so far.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..backends.base import BackendError, JobCancelled, failure_message, free_memory
from ..backends.lora import clear_cached_loras
from .adapters import save_checkpoint
from .dataset import prepare_image
from .families import Conditioning, Family, family_for, logit_normal

if TYPE_CHECKING:
    from PIL.Image import Image

    from .plan import TrainPlan

log = logging.getLogger("easel")
ADAPTER = "easel_training"
LOSS_WINDOW = 20  # steps averaged for the reported loss_avg


class TrainContext(Protocol):
    """What a training job uses of its context: the worker's JobContext, or in a
    model's own process the proxy of it (``backends/isolated.py``)."""

    job_id: str

    @property
    def cancelled(self) -> bool: ...

    def step(self, i: int, total: int, at: float | None = None) -> None: ...

    def set_extra(self, **values: Any) -> None: ...


@dataclass
class _Cached:
    latent: torch.Tensor  # (C, h, w) on the CPU
    cond: Conditioning


@dataclass
class _Progress:
    done: int = 0
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))
    saved_step: int = 0

    @property
    def loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def loss_avg(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None


class LoraTrainer:
    """``LoraTrainer(plan).run(backend, ctx)``: called by the worker for a train job."""

    def __init__(self, plan: TrainPlan) -> None:
        self.plan = plan

    def run(self, backend: Any, ctx: TrainContext) -> list[Image]:
        pipe = getattr(backend, "pipe", None)
        family_cls = family_for(self.plan.backend)
        if pipe is None or family_cls is None:
            raise BackendError(f"model {self.plan.model!r} is not loaded or cannot train LoRAs")
        family = family_cls(pipe)
        ctx.set_extra(phase="caching", images=len(self.plan.samples))
        with torch.no_grad():
            buckets = self._cache(family, ctx)
        progress = _Progress()
        transformer = family.transformer
        grad_before = any(p.requires_grad for p in transformer.parameters())
        try:
            optimizer = self._attach(family)
            self._train(family, buckets, optimizer, progress, ctx)
        finally:
            self._detach(family, grad_before)
        return []

    # ----------------------------------------------------------------- phases

    def _cache(self, family: Family, ctx: TrainContext) -> list[list[_Cached]]:
        """Latents and caption embeddings, once each, grouped by training size."""
        conds: dict[str, Conditioning] = {}
        buckets: dict[tuple[int, ...], list[_Cached]] = {}
        for sample in self.plan.samples:
            if ctx.cancelled:
                raise JobCancelled("stopped before the first step; no checkpoint was written")
            try:
                image = prepare_image(sample.image, self.plan.resolution)
            except OSError as exc:
                raise BackendError(
                    f"training image {sample.image} could not be read ({exc}); the dataset changed after it "
                    "was checked: fix it and start the run again"
                ) from exc
            latent = family.encode_image(family.pixels_to_tensor(image)).to("cpu", torch.float32)
            if sample.caption not in conds:
                cond = family.encode_caption(sample.caption)
                conds[sample.caption] = Conditioning(cond.embeds.to("cpu"), cond.ids.to("cpu") if cond.ids is not None else None)
            buckets.setdefault(tuple(latent.shape), []).append(_Cached(latent, conds[sample.caption]))
        return list(buckets.values())

    def _attach(self, family: Family) -> torch.optim.Optimizer:
        from peft import LoraConfig

        plan = self.plan
        transformer = family.transformer
        clear_cached_loras(transformer)  # adapters kept for generate jobs (disabled) would mute this one
        transformer.requires_grad_(False)
        config = LoraConfig(
            r=plan.rank,
            lora_alpha=plan.alpha,  # type: ignore[arg-type]  # annotated int; peft scales by alpha / r, floats work
            target_modules=list(family.target_modules),
            init_lora_weights=True,
        )
        transformer.add_adapter(config, adapter_name=ADAPTER)
        transformer.enable_adapters()  # LoRA layers a generate job switched off stay off otherwise
        transformer.set_adapter(ADAPTER)
        params = [p for p in transformer.parameters() if p.requires_grad]
        if not params:
            raise BackendError("the LoRA layers added for training have no trainable weights; the server log has details")
        for p in params:  # train the LoRA weights in float32 even on a bf16/fp16 model
            p.data = p.data.float()
        if plan.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        return torch.optim.AdamW(params, lr=plan.learning_rate)

    def _detach(self, family: Family, grad_before: bool) -> None:
        transformer = family.transformer
        transformer.eval()
        if self.plan.gradient_checkpointing:
            transformer.disable_gradient_checkpointing()
        if ADAPTER in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters(ADAPTER)
        transformer.requires_grad_(grad_before)
        free_memory()

    def _train(
        self,
        family: Family,
        buckets: list[list[_Cached]],
        optimizer: torch.optim.Optimizer,
        progress: _Progress,
        ctx: TrainContext,
    ) -> None:
        plan = self.plan
        gen = torch.Generator("cpu").manual_seed(plan.seed)
        weights = torch.tensor([len(b) for b in buckets], dtype=torch.float64)
        ctx.set_extra(phase="training")
        try:
            for step in range(1, plan.steps + 1):
                bucket = buckets[int(torch.multinomial(weights, 1, generator=gen))]
                picks = torch.randperm(len(bucket), generator=gen)[: plan.batch_size].tolist()
                loss = self._step(family, [bucket[k] for k in picks], optimizer, gen)
                progress.done = step
                progress.losses.append(loss)
                ctx.set_extra(step=step, loss=round(loss, 6), loss_avg=round(progress.loss_avg or 0.0, 6))
                if plan.save_every and step % plan.save_every == 0 and step < plan.steps:
                    self._save(family, progress, ctx, complete=False)
                ctx.step(step, plan.steps)  # raises JobCancelled once the job is stopped
        except JobCancelled:
            if progress.done == 0:
                raise JobCancelled("stopped before the first step; no checkpoint was written") from None
            self._save(family, progress, ctx, complete=False)
            raise JobCancelled(f"stopped at step {progress.done}; checkpoint saved") from None
        except Exception as exc:
            log.exception("training %s on %s failed at step %d", plan.adapter_name, plan.model, progress.done + 1)
            kept = (
                f"the checkpoint of step {progress.saved_step} is kept in {plan.output}"
                if progress.saved_step
                else "no checkpoint was written"
            )
            raise BackendError(f"training failed at step {progress.done + 1}: {failure_message(exc)}; {kept}") from exc
        self._save(family, progress, ctx, complete=True)

    def _step(self, family: Family, batch: list[_Cached], optimizer: torch.optim.Optimizer, gen: torch.Generator) -> float:
        device = family.device
        x0 = torch.stack([c.latent for c in batch]).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sigmas = family.sigmas(logit_normal(len(batch), gen), family.seq_len(x0.shape)).to(device, torch.float32)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        conds = [Conditioning(c.cond.embeds.to(device), c.cond.ids.to(device) if c.cond.ids is not None else None) for c in batch]
        pred = family.predict(noisy, sigmas, conds)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _save(self, family: Family, progress: _Progress, ctx: TrainContext, *, complete: bool) -> None:
        from peft.utils import get_peft_model_state_dict

        plan = self.plan
        transformer = family.transformer
        layers = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
        config = transformer.peft_config[ADAPTER].to_dict()
        config["target_modules"] = sorted(config.get("target_modules") or [])
        metadata = {
            "adapter_name": plan.adapter_name,
            "model": plan.model,
            "backend": plan.backend,
            "base_model": plan.base_model,
            "steps_done": progress.done,
            "steps": plan.steps,
            "complete": complete,
            "rank": plan.rank,
            "alpha": plan.alpha,
            "learning_rate": plan.learning_rate,
            "batch_size": plan.batch_size,
            "resolution": plan.resolution,
            "seed": plan.seed,
            "dataset": str(plan.dataset),
            "images": len(plan.samples),
            "final_loss": progress.loss,
            "final_loss_avg": progress.loss_avg,
            "target_modules": list(family.target_modules),
            "task_id": ctx.job_id,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        save_checkpoint(type(family.pipe), layers, config, Path(plan.output), metadata)
        progress.saved_step = progress.done
        ctx.set_extra(checkpoint_step=progress.done)
        log.info(
            "training %s on %s: checkpoint at step %d saved to %s", plan.adapter_name, plan.model, progress.done, plan.output
        )
