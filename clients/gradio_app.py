"""easel's Gradio front-end, over easel's own job API (never over the pipelines).

    python3 -m clients.gradio_app --server http://127.0.0.1:4030 [--port 7860] [--api-key KEY]

Gradio (``requirements-gradio.txt``) is imported only here; the server never needs it.
A job's queue position, ETA and progress follow ``/api/events`` (Server-Sent Events) while
it waits and runs; Cancel cancels the easel job; the gallery keeps the session's results
with their seeds. Scripts can drive it with ``gradio_client``::

    Client(app_url).predict("a red fox", 256, 256, 4, 7, api_name="/generate")  # -> image file
"""

from __future__ import annotations

import argparse
import html
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import httpx

from .common import FINISHED, SSEParser, Status, to_data_url
from .easel import Client
from .errors import ApiError

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
RANDOM_SEED = -1


class EaselError(gr.Error):
    """An easel refusal or failure, as a Gradio error a person can read."""


def readable(exc: ApiError, retry_after: str | None) -> str:
    if exc.status == 429:
        wait = f" Retry after {retry_after} s." if retry_after else ""
        return f"easel is busy (429): {exc.message}.{wait}".replace("..", ".")
    return f"easel refused the request ({exc.status}): {exc.message}" + (f" (field: {exc.param})" if exc.param else "")


class EaselClient(Client):
    """The blocking client, with a refusal raised as a Gradio error carrying easel's message."""

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EaselError(f"cannot reach easel at {self.base_url}: {exc}") from None
        self._raise_readable(response)
        return response

    def follow(self, task_id: str, timeout: float) -> Iterator[Status]:
        """Every status of the job from ``/api/events`` until it finishes (reconnecting
        with Last-Event-ID when a stream ends early); no polling loop."""
        deadline = time.monotonic() + timeout
        last_id: str | None = None
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            params = {"task_id": task_id, "heartbeat": 10}
            stream_timeout = httpx.Timeout(self.http_timeout, read=30.0)
            try:
                with self.http.stream("GET", "/api/events", params=params, headers=headers, timeout=stream_timeout) as r:
                    if not r.is_success:
                        r.read()
                        self._raise_readable(r)
                    parser = SSEParser()
                    for line in r.iter_lines():
                        if line.startswith("id:"):
                            last_id = line[3:].strip()
                        event = parser.feed(line)
                        if event is None or event[0] != "status":
                            continue
                        status: Status = json.loads(event[1])
                        yield status
                        if status["status"] in FINISHED:
                            return
            except httpx.HTTPError as exc:
                raise EaselError(f"lost easel's event stream for job {task_id}: {exc}") from None
        self._cancel_quietly(task_id)
        raise EaselError(f"job {task_id} did not finish within {timeout:.0f} s; it was cancelled")

    def _raise_readable(self, response: httpx.Response) -> None:
        try:
            self._check(response)
        except ApiError as exc:
            raise EaselError(readable(exc, response.headers.get("retry-after"))) from None

    def _cancel_quietly(self, task_id: str) -> bool:
        try:
            return self.cancel(task_id).get("status") == "cancelled"
        except (gr.Error, httpx.HTTPError):
            return False

    def fetch(self, status: Status, out_dir: Path) -> list[tuple[str, str]]:
        """The job's images saved under ``out_dir``: [(path, caption with the seed)]."""
        results = []
        for info in status.get("images", []):
            data = self._request("GET", "/api/image", params=self._image_params(status["task_id"], info["index"])).content
            path = out_dir / f"{status['task_id']}-{info['index']}.{EXTENSIONS.get(info.get('format', 'PNG'), 'png')}"
            path.write_bytes(data)
            results.append((str(path), f"seed {info['seed']}: {info.get('prompt', '')}"))
        return results


def progress_html(st: Status | None, note: str = "") -> str:
    """Position, ETA and a progress bar for the job's status."""
    if st is None:
        return f"<div class='easel-status'>{html.escape(note or 'Idle.')}</div>"
    state = st["status"]
    pct = 100 if state == "done" else round(100 * float(st.get("progress") or 0))
    eta = st.get("wait_remaining")
    parts = [f"<b>{html.escape(state)}</b>"]
    if state == "waiting":
        pos = int(st.get("pos") or 0)
        parts.append("next in the queue" if pos == 0 else f"queue position {pos} ({pos} job{'s' if pos != 1 else ''} ahead)")
    elif state == "running":
        parts.append(f"step {st.get('step', 0)}/{st['total_steps']}" if st.get("total_steps") else "starting")
    if state in ("waiting", "running"):
        parts.append(f"ETA {eta:.1f} s" if isinstance(eta, (int, float)) else "no ETA (no live worker)")
    if st.get("message"):
        parts.append(html.escape(str(st["message"])))
    if note:
        parts.append(html.escape(note))
    bar = (
        f"<div role='progressbar' aria-valuenow='{pct}' aria-valuemin='0' aria-valuemax='100' "
        "style='background:#ddd;border-radius:4px;height:14px;overflow:hidden;margin-top:6px'>"
        f"<div style='background:#f59e0b;height:100%;width:{pct}%'></div></div>"
    )
    return f"<div class='easel-status' data-status='{state}'>{' · '.join(parts)} · {pct}%{bar}</div>"


def build_app(server: str, api_key: str | None = None, timeout: float = 3600.0) -> gr.Blocks:
    out_dir = Path(tempfile.mkdtemp(prefix="easel-gradio-"))

    def client() -> EaselClient:
        return EaselClient(server, api_key, wait_mode="sse")

    def models() -> tuple[list[str], dict[str, Any]]:
        try:
            with client() as c:
                data = c.models()
        except EaselError:
            return [], {}
        default = next((m for m in data if m.get("default")), data[0] if data else None)
        return [m["id"] for m in data], (default or {})

    def body_of(prompt: str, width: float, height: float, steps: float, seed: float | None) -> dict[str, Any]:
        if not (prompt or "").strip():
            raise gr.Error("Write a prompt first.")
        body: dict[str, Any] = {"prompt": prompt, "width": int(width), "height": int(height), "steps": int(steps), "format": "PNG"}
        if seed is not None and int(seed) != RANDOM_SEED:
            body["seed"] = int(seed)
        return body

    def outcome(st: Status) -> None:
        if st["status"] == "error":
            raise EaselError(f"job {st['task_id']} failed: {st.get('message') or 'no reason given'}")

    def generate(prompt: str, width: float, height: float, steps: float, seed: float | None) -> str:
        """One image for (prompt, width, height, steps, seed); seed -1 = random."""
        with client() as c:
            task_id = c.submit("/api/generate", body_of(prompt, width, height, steps, seed))["task_id"]
            st: Status = {}
            for st in c.follow(task_id, timeout):  # noqa: B007  (the last one counts)
                pass
            outcome(st)
            if st["status"] == "cancelled":
                raise EaselError(f"job {st['task_id']} was cancelled")
            return c.fetch(st, out_dir)[0][0]

    def run(
        prompt: str, negative: str, model: str | None, width: float, height: float, steps: float, guidance: float | None,
        seed: float | None, n: float, refs: list[Any] | None, priority: bool, gallery: list[tuple[str, str]] | None,
    ) -> Iterator[tuple[Any, ...]]:
        gallery = list(gallery or [])
        body = body_of(prompt, width, height, steps, seed)
        body["n"] = int(n)
        body["priority"] = bool(priority)
        if negative and negative.strip():
            body["negative_prompt"] = negative
        if model:
            body["model"] = model
        if guidance is not None and guidance > 0:
            body["guidance"] = float(guidance)
        paths = [getattr(f, "name", f) for f in refs or []]
        if paths:
            body["images"] = [to_data_url(Path(p)) for p in paths]
        with client() as c:
            st = c.submit("/api/edit" if paths else "/api/generate", body)
            task_id = st["task_id"]
            finished = False
            try:
                first = {"status": "waiting", "pos": st.get("pos", 0), "wait_remaining": st.get("expected_time_seconds"), "progress": 0}
                yield task_id, progress_html(first), gr.skip(), gallery, gallery
                for st in c.follow(task_id, timeout):
                    finished = st["status"] in FINISHED
                    if not finished:
                        yield task_id, progress_html(st), gr.skip(), gallery, gallery
                outcome(st)
                if st["status"] == "cancelled":
                    yield task_id, progress_html(st), gr.skip(), gallery, gallery
                    return
                images = c.fetch(st, out_dir)
                gallery = images + gallery
                yield task_id, progress_html(st, f"{len(images)} image(s)"), images[0][0], gallery, gallery
            finally:
                if not finished:  # the session went away mid-job: do not leave it queued
                    c._cancel_quietly(task_id)

    def cancel(task_id: str) -> str:
        if not (task_id or "").strip():
            raise gr.Error("No job to cancel.")
        with client() as c:
            st = c.cancel(task_id.strip())
        return progress_html(st, "cancel requested")

    def refresh_models() -> Any:  # on each page load: easel may have started after the app
        names, default = models()
        return gr.Dropdown(choices=names, value=default.get("id"))

    names, default = models()
    caps = default.get("capabilities", {})
    with gr.Blocks(title="easel") as demo:
        gr.Markdown(f"## easel\nImages from the easel job server at `{server}`.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3)
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    model = gr.Dropdown(names, value=default.get("id"), label="Model", allow_custom_value=True)
                    priority = gr.Checkbox(label="Priority (ahead of the queue)", value=False)
                with gr.Row():
                    width = gr.Slider(64, 2048, step=16, value=caps.get("default_width") or 512, label="Width")
                    height = gr.Slider(64, 2048, step=16, value=caps.get("default_height") or 512, label="Height")
                with gr.Row():
                    steps = gr.Slider(1, 100, step=1, value=caps.get("recommended_steps") or 4, label="Steps")
                    guidance = gr.Number(value=caps.get("recommended_guidance"), label="Guidance (0 = model default)")
                with gr.Row():
                    seed = gr.Number(value=RANDOM_SEED, precision=0, label="Seed (-1 = random)")
                    n = gr.Slider(1, 8, step=1, value=1, label="Images (n)")
                refs = gr.File(label="Reference images (an edit when given)", file_count="multiple", file_types=["image"], height=120)
                with gr.Row():
                    go = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=2):
                job_id = gr.Textbox(label="Job", interactive=False)
                status = gr.HTML(progress_html(None), label="Progress")
                image = gr.Image(label="Result", type="filepath", interactive=False)
                gallery = gr.Gallery(label="This session's images", columns=3, height="auto")
        results = gr.State([])
        go.click(
            run, [prompt, negative, model, width, height, steps, guidance, seed, n, refs, priority, results],
            [job_id, status, image, gallery, results], api_name="run", show_progress="hidden", concurrency_limit=None,
        )
        stop.click(cancel, [job_id], [status], api_name="cancel", queue=False)
        # the scripting endpoint: exactly (prompt, width, height, steps, seed) -> image
        api_button = gr.Button(visible=False)
        api_button.click(generate, [prompt, width, height, steps, seed], [image], api_name="generate", concurrency_limit=None)
        demo.load(refresh_models, None, [model], api_visibility="private", queue=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m clients.gradio_app", description="easel's Gradio front-end")
    ap.add_argument("--server", default="http://127.0.0.1:4030", help="easel's URL (default http://127.0.0.1:4030)")
    ap.add_argument("--port", type=int, default=7860, help="where the app listens (default 7860)")
    ap.add_argument("--host", default="127.0.0.1", help="the app's address (default 127.0.0.1)")
    ap.add_argument("--api-key", default=None, help="easel API key, sent as Authorization: Bearer")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for a job (default 3600)")
    args = ap.parse_args(argv)
    build_app(args.server, args.api_key, args.timeout).queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
