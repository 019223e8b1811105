"""Command line: ``python server.py [--host --port --config --model NAME=PATH ...]``.

``EASEL_HOST``, ``EASEL_PORT``, ``EASEL_CONFIG``, ``EASEL_BROKER``, ``EASEL_ROLE`` and
``EASEL_LOG_LEVEL`` stand in for the flags of the same names (a container's environment);
a flag given wins."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from . import hostmem, logs
from .app import create_app
from .broker import unreachable
from .config import ConfigError, load_settings
from .families import FAMILIES, UPSCALERS, Family


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="easel: self-hosted image-generation job server")
    env = os.environ.get
    p.add_argument("--host", default=env("EASEL_HOST"), help="interface to bind (default from settings: 127.0.0.1; $EASEL_HOST)")
    p.add_argument("--port", type=int, default=env("EASEL_PORT"), help="port (default from settings: 4030; $EASEL_PORT)")
    p.add_argument("--config", default=env("EASEL_CONFIG"),
                   help="local settings file merged over the shipped default (default: ./local.json if present; $EASEL_CONFIG)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="load a model at start-up: a configured model's new model_path, or a new model whose "
                        "backend is read from the Diffusers folder's model_index.json (repeatable)")
    p.add_argument("--default-model", help="model used when a request names none")
    p.add_argument("--device", help="device for every model (cpu, cuda, cuda:1, mps)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="torch dtype for every model")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=env("EASEL_LOG_LEVEL"))
    p.add_argument("--broker", metavar="URL", default=env("EASEL_BROKER"),
                   help="where the queue lives: 'memory' (this process, the default) or redis://HOST:PORT/DB, "
                        "shared by any number of API nodes and workers ($EASEL_BROKER)")
    p.add_argument("--role", choices=["all", "api", "worker"], default=env("EASEL_ROLE"),
                   help="all: API and workers (default); api: serve HTTP, load no model; worker: run the enabled "
                        "models' jobs, serve only /healthz and /metrics ($EASEL_ROLE)")
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace, model_names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("host", "port", "default_model", "log_level"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    broker = {key: value for key in ("url", "role") if (value := getattr(args, "broker" if key == "url" else key, None))}
    if broker:
        out["broker"] = broker
    models: dict[str, dict[str, Any]] = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {spec!r}: expected NAME=PATH")
        models[name] = {"model_path": path, "enabled": True}
        if name not in model_names:
            models[name].update(new_model_config(spec, path))
    if models and args.default_model is None:
        out["default_model"] = next(iter(models))  # requests naming no model go to the one asked for
    for name in [*model_names, *models]:
        if args.device:
            models.setdefault(name, {})["device"] = args.device
        if args.dtype:
            models.setdefault(name, {})["torch_dtype"] = args.dtype
    if models:
        out["models"] = models
    return out


# model_index.json "_class_name" -> the family that serves it
PIPELINE_FAMILIES: dict[str, Family] = {pipeline: f for f in FAMILIES.values() for pipeline in f.pipelines}


def new_model_config(spec: str, path: str) -> dict[str, Any]:
    """The backend and tasks of an unconfigured ``--model NAME=PATH``, from the
    folder's model_index.json (a .pth/.safetensors file is an upscaler)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix in (".pth", ".safetensors"):
        return {"backend": UPSCALERS[0]}
    index = p / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--model {spec!r}: {index} could not be read ({exc.__class__.__name__}); point at a Diffusers "
            "folder, or configure the model in the settings file"
        ) from None
    if class_name not in PIPELINE_FAMILIES:
        raise ConfigError(
            f"--model {spec!r}: pipeline {class_name!r} is not served by easel (supported: "
            f"{', '.join(PIPELINE_FAMILIES)}); configure the model in the settings file"
        )
    family = PIPELINE_FAMILIES[class_name]
    return {"backend": family.key, "tasks": list(family.tasks)}


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown, so the process
    dies by the signal; easel drains its jobs and exits with status 0 instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        base = load_settings(args.config)
        settings = load_settings(args.config, overrides_from(args, list(base.models)))
    except ConfigError as exc:
        print(f"easel: bad configuration: {exc}", file=sys.stderr)
        return 2
    if (why := unreachable(settings.broker.url)) is not None:
        print(f"easel: {why}; start Redis, or fix broker.url (--broker)", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)
    hostmem.tune(settings.host_memory.retain_mib)  # before any model allocates
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        proxy_headers=False,  # X-Forwarded-*: only from http.trusted_proxies (server/forwarded.py)
        timeout_graceful_shutdown=5,  # open SSE/long-poll connections; jobs get queue.shutdown_grace_seconds
    )
    try:  # the port first: a busy one is one line, before any model loads or any job is claimed
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        print(f"easel: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}; "
              "stop what uses it or choose another port (--port)", file=sys.stderr)  # fmt: skip
        return 2
    _Server(config).run(sockets=[sock])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (uvicorn serves on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every small answer waits ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock

