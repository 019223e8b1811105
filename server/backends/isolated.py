"""Run any backend in a child process, so that unloading really frees its memory.

``IsolatedBackend`` implements the Backend protocol by forwarding to a backend that
lives in a ``multiprocessing`` *spawn* child: ``load`` starts the child and loads the
model there, ``run`` sends the ``WorkItem`` (PIL images pickle) and relays every step,
preview and the result back, ``unload`` stops the child — the operating system then
reclaims all of its RAM and GPU memory, which the CUDA caching allocator and the C
heap of a long-lived process do not give back.

Every backend but the stub and the upscaler runs this way by default (``backends.runs_isolated``): the
server's event loop then never shares a GIL with a pipeline.

The step protocol is synchronous: after each denoising step the child sends
``("step", i, total)`` and waits for the parent's answer, which carries whether a
preview is wanted and whether the job was cancelled (the parent's ``ctx.step``
raised ``JobCancelled``); the child then raises ``JobCancelled`` itself, so the
pipeline stops at the same point as in-process.  One round trip per step costs
well under a millisecond.  A LoRA-training job runs in the child too (``train``):
its status (``set_extra``) goes to the parent as it comes, and ``ctx.cancelled``
asks the parent.

The child measures the model's size after loading (``residency.measure_mib``: on a
CUDA device the growth of its own ``torch.cuda.memory_allocated``) and sends it with
the load's answer (``size_mib``); the parent never touches the model's device.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import traceback
from typing import TYPE_CHECKING, Any

from .. import hostmem
from .base import BackendError, Capabilities, JobCancelled, WorkItem, count_tokens, model_capabilities

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from PIL.Image import Image

    from ..config import ModelConfig, Settings
    from ..training.lora_trainer import TrainContext
    from ..training.plan import TrainPlan
    from .base import StepContext

log = logging.getLogger(__name__)
STOP_TIMEOUT = 10.0


class _ChildContext:
    """The StepContext (and, for training, the JobContext) seen by the backend inside
    the child."""

    def __init__(self, conn: Connection, job_id: str = "") -> None:
        self.conn = conn
        self.job_id = job_id
        self._preview_wanted = False

    @property
    def cancelled(self) -> bool:
        self.conn.send(("cancelled?",))
        return bool(self.conn.recv())

    def set_extra(self, **values: Any) -> None:
        self.conn.send(("extra", values))

    def step(self, i: int, total: int) -> None:
        self.conn.send(("step", i, total))
        self._preview_wanted, cancelled = self.conn.recv()
        if cancelled:
            raise JobCancelled()

    def wants_preview(self, i: int) -> bool:
        return self._preview_wanted

    def preview(self, image: Image) -> None:
        self.conn.send(("preview", image))


def _child_main(conn: Connection, name: str, cfg: ModelConfig, settings: Settings) -> None:
    from .. import residency
    from . import create_backend

    hostmem.tune(settings.host_memory.retain_mib)
    backend = create_backend(name, cfg, settings, isolate=False)
    while True:
        try:
            command, payload = conn.recv()
        except EOFError:
            return
        try:
            if command == "load":
                conn.send(("done", residency.load_and_measure(backend, name, cfg)))
            elif command == "run":
                conn.send(("done", backend.run(payload, _ChildContext(conn))))
            elif command == "train":
                from ..training.lora_trainer import LoraTrainer

                plan, job_id = payload
                conn.send(("done", LoraTrainer(plan).run(backend, _ChildContext(conn, job_id))))
            elif command == "tokens":
                conn.send(("done", count_tokens(backend, payload)))
            elif command == "stop":
                backend.unload()
                conn.send(("done", None))
                return
        except JobCancelled as exc:
            conn.send(("cancelled", str(exc)))
        except BackendError as exc:
            conn.send(("backend_error", str(exc)))
        except Exception as exc:  # report, keep serving: the model may still be usable
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class IsolatedBackend:
    """A Backend proxy whose model lives in its own process (see module docstring)."""

    def __init__(self, name: str, cfg: ModelConfig, settings: Settings) -> None:
        from . import BACKENDS

        self.name = name
        self.cfg = cfg
        self.settings = settings
        module_name, _, cls_name = BACKENDS[cfg.backend].partition(":")
        inner = getattr(importlib.import_module(f"{__package__}.{module_name}"), cls_name)
        self.capabilities: Capabilities = model_capabilities(cfg, getattr(inner, "default_tasks", ("generate",)))
        self._proc: Any = None
        self._conn: Connection | None = None
        self.size_mib: float | None = None  # measured in the child after its load

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def load(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        spawn = mp.get_context("spawn")
        parent, child = spawn.Pipe()
        self._proc = spawn.Process(
            target=_child_main, args=(child, self.name, self.cfg, self.settings), name=f"easel-{self.name}", daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent
        try:
            self.size_mib = self._call("load", None, None)
        except BaseException:
            self._kill()
            raise

    def run(self, item: WorkItem, ctx: StepContext) -> list[Image]:
        if self._conn is None:
            raise BackendError(f"model {self.name!r} is not loaded; load it first")
        result: list[Image] = self._call("run", item, ctx)
        return result

    def train(self, plan: TrainPlan, ctx: TrainContext) -> list[Image]:
        """Run a LoRA-training job on the model in its process (``LoraTrainer``)."""
        if self._conn is None:
            raise BackendError(f"model {self.name!r} is not loaded; load it first")
        result: list[Image] = self._call("train", (plan, ctx.job_id), ctx)
        return result

    def unload(self) -> None:
        if self._conn is not None:
            try:
                self._call("stop", None, None)
            except (BackendError, OSError):
                pass
        self._kill()

    def cost_prior(self, fit: str) -> dict[str, float] | None:
        return None

    def count_tokens(self, prompt: str) -> tuple[int, int | None]:
        """The model's tokenizer lives in its process: ask it."""
        if self._conn is None:
            raise BackendError(f"model {self.name!r} is not loaded; load it first")
        tokens, limit = self._call("tokens", prompt, None)
        return int(tokens), limit

    def kill(self) -> None:
        """Kill the model's process now (a hung job, any thread): the ``run`` blocked on
        it raises ``BackendError`` and cleans up; ``load`` then starts a new process."""
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def _call(self, command: str, payload: Any, ctx: Any) -> Any:
        """Send ``command`` and serve the child's requests until its answer; ``ctx``: the
        job's context (the runner's JobContext: a StepContext, with ``set_extra`` for a
        training job) or None."""
        assert self._conn is not None
        conn = self._conn
        cancelled = False
        try:
            conn.send((command, payload))
            while True:
                kind, *rest = conn.recv()
                if kind == "step":
                    if ctx is None:
                        conn.send((False, False))
                        continue
                    i, total = rest
                    try:
                        ctx.step(i, total)
                    except JobCancelled:
                        cancelled = True
                    conn.send((not cancelled and ctx.wants_preview(i), cancelled))
                elif kind == "preview" and ctx is not None:
                    ctx.preview(rest[0])
                elif kind == "cancelled?":
                    conn.send(ctx is not None and ctx.cancelled)
                elif kind == "extra" and ctx is not None:
                    ctx.set_extra(**rest[0])
                elif kind == "done":
                    return rest[0]
                elif kind == "cancelled":
                    raise JobCancelled(rest[0]) if rest[0] else JobCancelled()
                elif kind == "backend_error":
                    raise BackendError(rest[0])
                elif kind == "error":
                    log.error("model process of %s failed: %s", self.name, rest[0])
                    raise BackendError(f"model {self.name!r} failed: {rest[0].splitlines()[0]}")
        except (EOFError, BrokenPipeError, ConnectionResetError):
            code = self._proc.exitcode if self._proc is not None else None
            self._kill()
            raise BackendError(
                f"the process of model {self.name!r} exited unexpectedly (exit code {code}); "
                "it was probably killed for lack of memory — load the model again, with a smaller size or offload"
            ) from None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join(STOP_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join()
