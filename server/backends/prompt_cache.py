"""A small LRU per model of text-encoder outputs (``models.NAME.prompt_cache_size``).

A repeated prompt (a batch of seeds sent as jobs, a retry, the web UI's "reuse") skips
the text encoder: the pipeline's own ``encode_prompt`` is wrapped on the pipeline
instance, and its result is kept under a key made of every argument it was called
with (prompt, negative prompt, device, images per prompt, sequence length, encoder
layers, CFG, LoRA scale: the encoder settings), the pipeline class, and the job's
LoRAs (an adapter may change the text encoder).  A call with an argument that is not
plain data (pre-computed embeddings, images: Qwen-Image-Edit encodes its references
with the prompt) is not cached.  Pipelines do not change the embeddings they get in
place (they ``.to``/``.repeat`` them into new tensors), so entries are shared as is.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from typing import Any

import torch

PLAIN = (str, int, float, bool, type(None))


def plain_key(value: Any) -> Any:
    """``value`` as a hashable key, or raise ``TypeError`` when it is not plain data."""
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return tuple(plain_key(v) for v in value)
    raise TypeError(type(value).__name__)


class PromptCache:
    """Text-encoder outputs of one model, least recently used dropped past ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.scope: Any = ()  # what else the outputs depend on: the running job's LoRAs
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def wrap(self, pipe: Any) -> None:
        """Route ``pipe.encode_prompt`` through the cache (once per pipeline instance)."""
        if self.size <= 0 or not hasattr(pipe, "encode_prompt") or getattr(pipe, "_easel_prompt_cache", None) is self:
            return
        encode = pipe.encode_prompt  # the bound method of the pipeline's class
        signature = inspect.signature(encode)
        owner = type(pipe).__qualname__

        def cached_encode_prompt(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                key = (owner, self.scope, plain_key(tuple(bound.arguments.items())))
            except TypeError:  # embeddings or images given: nothing to look up
                return encode(*args, **kwargs)
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return self._entries[key]
            out = encode(*args, **kwargs)
            with self._lock:
                self.misses += 1
                self._entries[key] = out
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            return out

        pipe.encode_prompt = cached_encode_prompt
        pipe._easel_prompt_cache = self
