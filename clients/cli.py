"""Command line for easel.

    python -m clients generate "a lighthouse at dusk" -o out.png --steps 4
    python -m clients edit "make it night" -i ref.png -o night.png
    python -m clients status TASK_ID
    python -m clients cancel TASK_ID
    python -m clients models

The server comes from --url or $EASEL_URL (default http://127.0.0.1:4030), the key
from --api-key or $EASEL_API_KEY.  While a job runs a progress bar (step, percent,
ETA) is drawn on stderr in plain text; results go to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import httpx

from .common import GenerateOptions, Status, output_paths
from .easel import Client
from .errors import EaselError

BAR_WIDTH = 24


class ProgressBar:
    """A one-line text progress bar; redraws in place on a terminal, prints
    a line per change otherwise."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def __call__(self, st: Status) -> None:
        filled = int(BAR_WIDTH * st.get("progress", 0))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        state = st["status"]
        where = f"#{st['pos'] + 1} in queue" if state == "waiting" else f"step {st.get('step', 0)}/{st.get('total_steps', 0)}"
        eta = st.get("wait_remaining")  # absent: no live worker serves the model (the message says so)
        if isinstance(eta, (int, float)):
            tail = f"ETA {eta:6.1f} s"
        else:
            tail = f"no ETA: {st.get('message') or 'no live worker serves this model'}"
        line = f"[{bar}] {st.get('progress', 0) * 100:3.0f}% {state:<9} {where:<14} {tail}"
        if line == self.last:
            return
        self.last = line
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default=None, help="file to write (out.png; several images -> out-0.png, out-1.png...)")
    p.add_argument("--model")
    p.add_argument("--negative-prompt")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--sampler", help="an A1111 sampler name the model runs, e.g. 'DPM++ 2M'")
    p.add_argument("--scheduler", help="an A1111 schedule for the sampler: Automatic, Karras, Exponential, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("-n", "--n", type=int, help="number of images")
    p.add_argument("--format", choices=["PNG", "JPEG", "WEBP"])
    p.add_argument("--quality", type=int)
    p.add_argument("--priority", action="store_true", default=None, help="jump ahead of non-priority jobs")


def parser(prog: str = "python -m clients", epilog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="easel command-line client", epilog=epilog)
    p.add_argument("--url", default=os.environ.get("EASEL_URL", "http://127.0.0.1:4030"), help="server URL ($EASEL_URL)")
    p.add_argument("--api-key", default=os.environ.get("EASEL_API_KEY"), help="API key ($EASEL_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a job (default 600)")
    p.add_argument("--wait-mode", choices=["sse", "poll"], default="sse", help="follow jobs by SSE (default) or long-poll")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command", required=True)
    _job_args(sub.add_parser("generate", help="text to image"))
    edit = sub.add_parser("edit", help="edit with reference images")
    _job_args(edit)
    edit.add_argument("-i", "--image", action="append", required=True, help="reference image file (repeatable)")
    for name, text in (("status", "a job's status"), ("cancel", "cancel a job")):
        sub.add_parser(name, help=text).add_argument("task_id")
    sub.add_parser("models", help="loaded models and their capabilities")
    return p


def _options(args: argparse.Namespace) -> GenerateOptions:
    keys = ("model", "negative_prompt", "width", "height", "steps", "guidance", "sampler", "scheduler", "seed", "n", "format",
            "quality", "priority")  # fmt: skip
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}  # type: ignore[return-value]


def _run_job(client: Client, args: argparse.Namespace, bar: ProgressBar | None) -> Any:
    output = args.output or f"easel-{int(time.time())}.png"
    call: Callable[..., Any] = client.generate
    extra: tuple[Any, ...] = ()
    if args.command == "edit":
        call, extra = client.edit, (args.image,)
    current: list[str] = []

    def progress(st: Status) -> None:
        current[:] = [st["task_id"]]
        if bar:
            bar(st)

    try:
        images = call(args.prompt, *extra, output=output, on_progress=progress, **_options(args))
    except KeyboardInterrupt:
        if current:  # the user gave up: free the queue slot
            client.cancel(current[0])
            print(f"cancelled job {current[0]}", file=sys.stderr)
        raise
    finally:
        if bar:
            bar.close()
    paths = output_paths(output, len(images))
    return [{"path": str(p), "seed": img.info.get("seed"), "width": img.width, "height": img.height} for p, img in zip(paths, images, strict=True)]


def main(argv: list[str] | None = None, prog: str = "python -m clients", epilog: str | None = None) -> int:
    args = parser(prog, epilog).parse_args(argv)
    bar = None if args.quiet else ProgressBar()
    try:
        with Client(args.url, args.api_key, args.timeout, wait_mode=args.wait_mode) as client:
            if args.command in ("generate", "edit"):
                result: Any = _run_job(client, args, bar)
            elif args.command == "status":
                result = client.status(args.task_id)
            elif args.command == "cancel":
                result = client.cancel(args.task_id)
            else:
                result = client.models()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except httpx.TransportError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    except (EaselError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0
