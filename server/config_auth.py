"""The settings of who may do what (``auth``): API and admin keys, each key's name,
fair-share weight, quota and allow-lists, the default quota of every key without its
own, and the signed image links; and the one check of them that needs the whole
settings (an allow-list names only configured models).  Read by ``auth.py``."""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

PositiveInt = Annotated[int, Meta(ge=1)]


class QuotaConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """What a key may do: its quota and its allow-lists (None: no limit).  Set per key
    (``KeyConfig``) or in ``auth.quota`` for every key without its own (field by field)."""

    max_queued: PositiveInt | None = None  # unfinished jobs (waiting or running) a key may have at once
    gpu_seconds_per_hour: Annotated[float, Meta(gt=0)] | None = None  # worker time a key's jobs may use per hour
    # allow-lists (server/allowlist.py): a job outside them is a 403 not_allowed
    models: list[str] | None = None  # the models its jobs may name (and the listings show it)
    loras: list[str] | None = None  # the LoRA adapters its jobs may use
    max_pixels: PositiveInt | None = None  # pixels of each image a job delivers (after any upscale)
    max_steps: PositiveInt | None = None  # denoising steps of each generate or edit
    max_images: PositiveInt | None = None  # images one job makes


class KeyConfig(QuotaConfig, kw_only=True):
    """An API key with a name (shown as its key id) and its own quota and allow-lists."""

    key: Annotated[str, Meta(min_length=1)]
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    weight: Annotated[int, Meta(ge=1, le=1000)] = 1  # its share of turns within a priority (queue.fairness "fair")


class AuthConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    api_keys: list[str | KeyConfig] = []
    admin_keys: list[str | KeyConfig] = []
    quota: QuotaConfig = msgspec.field(default_factory=QuotaConfig)  # for every key without its own
    # signs the image links handed out (OpenAI url responses, webhooks, status); default:
    # derived from the configured keys, so every node with the same keys agrees
    url_secret: str | None = None
    # how long a signed image link works (default: queue.result_ttl_seconds)
    link_ttl_seconds: Annotated[float, Meta(gt=0)] | None = None
    # with any key configured, callers without one are refused (401) unless this is true:
    # then they use /api and /v1 (not the admin routes) and own their jobs together
    anonymous: bool = False


def allow_list_problem(auth: AuthConfig, models: Collection[str]) -> str | None:
    """An allow-list (``models``) that names a model the settings do not configure."""
    places = [("auth.quota", auth.quota)] + [
        (f"auth.{group}[{i}]", entry) for group, entries in (("api_keys", auth.api_keys), ("admin_keys", auth.admin_keys))
        for i, entry in enumerate(entries) if isinstance(entry, KeyConfig)
    ]  # fmt: skip
    for where, quota in places:
        for name in quota.models or ():
            if name not in models:
                return f"{where}.models names {name!r}, which is not a configured model; the models are {', '.join(sorted(models))}"
    return None
