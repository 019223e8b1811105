"""Per-request LoRA adapters for Diffusers pipelines.

``applied_loras`` resolves each requested name inside the model's ``lora_dir``
(names escaping it are refused), loads the adapters and sets their scales.  With a
cache (``models.NAME.lora_cache_size`` > 0, the default 4) the adapters stay loaded
by name after the job, disabled, so the next job runs with base weights and a job
that asks for a cached adapter again only switches to it (``set_adapters``): no file
is read and nothing is re-fused; the least recently used adapter past the cache size
is deleted.  The cache lives with the denoiser module, which ``from_pipe`` variants
share.  Without a cache the adapters are removed when the job ends.

On a model with ``compile: "regional"`` adapters are swapped in place instead
(``hotswapped_lora``: Diffusers' LoRA hotswap, prepared at load with
``enable_lora_hotswap(target_rank=lora_max_rank)``): one adapter slot whose weights
are replaced (``load_lora_weights(..., hotswap=True)``), ranks padded to
``lora_max_rank`` and scales held in tensors, so switching LoRAs, changing a scale or
running without one (scale 0) never recompiles the compiled blocks; only the first
LoRA after a load changes the blocks (one compile).  One LoRA per job there, on the
denoiser only (Diffusers does not hotswap text-encoder LoRA weights).
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..items import Lora
from .base import BackendError

if TYPE_CHECKING:
    from collections.abc import Iterator

WEIGHT_SUFFIXES = (".safetensors", ".bin")
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def resolve_lora(name: str, lora_dir: str | None, model: str) -> Path:
    """The weight file for LoRA ``name``: ``lora_dir/name`` as a file, as
    ``name.safetensors``, or a folder holding one weight file (as written by training
    or ``save_lora_weights``).  Checked at submit (``build.build_job``) and again
    when the job runs."""
    if not lora_dir:
        raise BackendError(f"model {model!r} has no lora_dir configured, so it cannot use LoRA {name!r}")
    if not is_plain_name(name):
        raise BackendError(
            f"LoRA name {name!r} is not a name inside the model's lora_dir; "
            "use an adapter's plain name (a file or folder name there, without any path)"
        )
    try:
        return _find_weights(name, Path(lora_dir).expanduser().resolve(), lora_dir, model)
    except (OSError, ValueError) as exc:  # e.g. a name too long for the file system
        raise BackendError(f"LoRA {name!r} cannot be read in {lora_dir} for model {model!r} ({exc})") from None


def is_plain_name(name: str) -> bool:
    """A file or folder name: no path separators, not '.' or '..', no NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _find_weights(name: str, root: Path, lora_dir: str, model: str) -> Path:
    target = (root / name).resolve()
    if target == root or not target.is_relative_to(root):  # a link out of lora_dir
        raise BackendError(f"LoRA name {name!r} is not a name inside the model's lora_dir; use a plain name")
    candidates = [target, target.with_name(target.name + ".safetensors")]
    for path in candidates:
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            return path
    if target.is_dir():
        if (target / DEFAULT_WEIGHT_NAME).is_file():
            return target / DEFAULT_WEIGHT_NAME
        files = sorted(p for p in target.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if len(files) == 1:
            return files[0]
        raise BackendError(
            f"LoRA folder {name!r} holds {len(files)} weight files; it must hold exactly one (or {DEFAULT_WEIGHT_NAME})"
        )
    available = sorted(p.stem for p in root.iterdir()) if root.is_dir() else []
    raise BackendError(
        f"LoRA {name!r} not found in {lora_dir} for model {model!r}"
        + (f" (available: {', '.join(available[:20])})" if available else " (the folder is empty or missing)")
    )


def adapter_name(index: int, name: str) -> str:
    return f"easel{index}_" + re.sub(r"\W", "_", name)[:40]


def load_loras(pipe: Any, specs: list[Lora], lora_dir: str | None, model: str) -> list[str]:
    """Load and activate ``specs``; returns the adapter names (for ``remove_loras``)."""
    names: list[str] = []
    try:
        for k, spec in enumerate(specs):
            path = resolve_lora(spec.name, lora_dir, model)
            adapter = adapter_name(k, spec.name)
            try:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
            except Exception as exc:  # peft/diffusers raise many types for bad files
                raise BackendError(
                    f"LoRA {spec.name!r} could not be applied to model {model!r}: {exc}. "
                    "Check that it was trained for this model family"
                ) from exc
            if adapter not in {a for group in pipe.get_list_adapters().values() for a in group}:
                raise BackendError(
                    f"LoRA {spec.name!r} has no weights matching model {model!r}; "
                    "it was probably trained for another model family"
                )
            names.append(adapter)
        pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
    except BaseException:
        remove_loras(pipe, names)
        raise
    return names


def remove_loras(pipe: Any, names: list[str]) -> None:
    if names:
        pipe.delete_adapters(names)


@contextmanager
def applied_loras(
    pipe: Any, specs: list[Lora], lora_dir: str | None, model: str, cache_size: int = 0, hotswap: bool = False
) -> Iterator[None]:
    if hotswap:
        hotswapped_lora(pipe, specs, lora_dir, model)
        yield
        return
    if not specs:
        yield
        return
    if cache_size <= 0:
        names = load_loras(pipe, specs, lora_dir, model)
        try:
            yield
        finally:
            remove_loras(pipe, names)
        return
    activate_cached(pipe, specs, lora_dir, model, cache_size)
    try:
        yield
    finally:
        pipe.disable_lora()  # kept loaded for the next job; this one's scales no longer apply


# denoiser module -> (weight file, mtime) -> adapter name, least recently used first
_CACHES: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[str, int], str]] = weakref.WeakKeyDictionary()


def _cache_of(pipe: Any) -> OrderedDict[tuple[str, int], str]:
    owner = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None) or pipe
    return _CACHES.setdefault(owner, OrderedDict())


def cached_adapters(pipe: Any) -> list[str]:
    """The adapter names kept loaded on ``pipe``'s denoiser, least recently used first."""
    return list(_cache_of(pipe).values())


def clear_cached_loras(transformer: Any) -> None:
    """Delete every adapter cached on a denoiser module (before training adds its own)."""
    cache = _CACHES.get(transformer)
    if hasattr(transformer, "enable_adapters") and getattr(transformer, "_hf_peft_config_loaded", False):
        transformer.enable_adapters()  # while adapters are loaded: the layers forget the last job's disable
    if cache:
        transformer.delete_adapters(list(cache.values()))
        cache.clear()


def activate_cached(pipe: Any, specs: list[Lora], lora_dir: str | None, model: str, cache_size: int) -> list[str]:
    """Load (once) and activate ``specs`` with their scales; returns their adapter names."""
    cache = _cache_of(pipe)
    weights: dict[str, float] = {}
    for spec in specs:
        path = resolve_lora(spec.name, lora_dir, model)
        key = (str(path), path.stat().st_mtime_ns)  # a rewritten file is a new adapter
        adapter = cache.get(key)
        if adapter is None:
            adapter = "easel_" + re.sub(r"\W", "_", spec.name)[:32] + "_" + hashlib.sha1(repr(key).encode()).hexdigest()[:8]
            load_loras_as(pipe, spec, path, adapter, model)
            cache[key] = adapter
        cache.move_to_end(key)
        weights[adapter] = weights.get(adapter, 0.0) + spec.scale  # the same LoRA twice: scales add
    stale = [k for k in cache if cache[k] not in weights][: max(0, len(cache) - max(cache_size, len(weights)))]
    if stale:
        pipe.delete_adapters([cache.pop(k) for k in stale])
    pipe.enable_lora()
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    return list(weights)


def load_loras_as(pipe: Any, spec: Lora, path: Path, adapter: str, model: str) -> None:
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    except Exception as exc:  # peft/diffusers raise many types for bad files
        _delete_quietly(pipe, adapter)
        raise BackendError(
            f"LoRA {spec.name!r} could not be applied to model {model!r}: {exc}. Check that it was trained for this model family"
        ) from exc
    if adapter not in {a for group in pipe.get_list_adapters().values() for a in group}:
        raise BackendError(
            f"LoRA {spec.name!r} has no weights matching model {model!r}; it was probably trained for another model family"
        )


HOT = "easel_hot"  # the one adapter slot of a compiled model
# denoiser module -> (weight file, mtime) of the adapter in its slot, and each LoRA layer's scaling at scale 1
_HOT: weakref.WeakKeyDictionary[Any, tuple[tuple[str, int], dict[Any, float]]] = weakref.WeakKeyDictionary()


def hotswapped_lora(pipe: Any, specs: list[Lora], lora_dir: str | None, model: str) -> None:
    """The job's LoRA (or none: scale 0) in the compiled denoiser's one slot (see the module doc)."""
    if len(specs) > 1:
        raise BackendError(
            f"model {model!r} compiles its denoiser (compile 'regional') and swaps one LoRA in place per job; "
            f"this job asks for {len(specs)}: send one, or set compile to 'off'"
        )
    owner = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None) or pipe
    current = _HOT.get(owner)
    if specs:
        path = resolve_lora(specs[0].name, lora_dir, model)
        key = (str(path), path.stat().st_mtime_ns)
        if current is None or current[0] != key:
            if current is not None:
                _HOT[owner] = (("", 0), current[1])  # until the swap succeeds the slot's weights are nobody's
            _swap_in(pipe, owner, specs[0], path, model, swap=current is not None)
            current = _HOT[owner] = (key, {m: float(m.scaling[HOT]) for m in owner.modules() if HOT in getattr(m, "scaling", {})})
    if current is not None:
        scale = specs[0].scale if specs else 0.0
        for module, base in current[1].items():
            value = module.scaling[HOT]
            if hasattr(value, "fill_"):
                value.fill_(base * scale)  # in place: the compiled code reads the tensor
            else:
                module.scaling[HOT] = base * scale


def _swap_in(pipe: Any, owner: Any, spec: Lora, path: Path, model: str, *, swap: bool) -> None:
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=HOT, hotswap=swap)
    except Exception as exc:  # peft/diffusers raise many types: text-encoder weights, a rank over target_rank, other layers
        if not swap:
            _delete_quietly(pipe, HOT)
        raise BackendError(
            f"LoRA {spec.name!r} could not be swapped into model {model!r} (compile 'regional' swaps LoRAs in place: one "
            f"LoRA on the denoiser's layers, of rank up to models.{model}.lora_max_rank): {exc}"
        ) from exc
    adapters = pipe.get_list_adapters()  # component name -> its adapters
    denoiser = "transformer" if owner is getattr(pipe, "transformer", None) else "unet"
    others = [name for name, group in adapters.items() if HOT in group and name != denoiser]
    if HOT not in adapters.get(denoiser, []) or others:
        _delete_quietly(pipe, HOT)
        raise BackendError(
            f"LoRA {spec.name!r} does not fit model {model!r}'s in-place swapping (compile 'regional'): "
            + (f"it has weights for {', '.join(others)}, which Diffusers does not swap; use a denoiser-only LoRA or compile 'off'"
               if others else "it has no weights for the denoiser; it was probably trained for another model family")
        )  # fmt: skip


def _delete_quietly(pipe: Any, adapter: str) -> None:
    try:
        if adapter in {a for group in pipe.get_list_adapters().values() for a in group}:
            pipe.delete_adapters([adapter])
    except Exception:  # the failure being reported matters more
        pass
