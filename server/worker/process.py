"""A model in its own process, so that unloading really frees its memory.

``ModelProcess`` implements the Backend protocol by forwarding to a backend that
lives in a ``multiprocessing`` *spawn* child: ``load`` starts the child and loads the
model there, ``run`` sends the ``WorkItem`` (PIL images pickle) and relays every step,
preview and the result back, ``unload`` stops the child — the operating system then
reclaims all of its RAM and GPU memory, which the CUDA caching allocator and the C
heap of a long-lived process do not give back.

Every backend but the stub and the upscaler runs this way by default (``backends.runs_isolated``): the
server's event loop then never shares a GIL with a pipeline.

One call at a time: the pipe carries one conversation, so every call holds the
process's lock (two jobs never read each other's steps or images).

A device error that is not out-of-memory (an illegal address, a device-side assert)
leaves CUDA's context broken for good: the child reports it and exits, and the call
raises ``ModelProcessLost``, as it does when the process dies (killed for memory);
the model host then starts a new process before the model's next job.

The step protocol never makes the model wait for the server: after each denoising
step the child sends ``("step", i, total, when)`` and goes on.  The parent answers
every step it reads with ``("answer", i, preview, cancelled)``: whether a preview is
wanted after the *next* step (and whether the job was cancelled: the parent's
``ctx.step`` raised ``JobCancelled``); it answers ``0`` as the call starts.  At each
step the child takes the answer to its previous step, which has long arrived unless
the parent is a whole step behind (then, and only then, it waits), and raises
``JobCancelled`` itself: a cancelled job stops one step later than in-process, and a
server busy with requests (its GIL held by the event loop) no longer holds up every
step of the model.  ``when`` is the child's ``time.monotonic()`` (one clock for every
process on the machine), so the step times the forecast learns from are the model's,
not the moment the parent got to read them; a preview says which step it is of.  A
LoRA-training job runs in the child too (``train``): its status (``set_extra``) goes
to the parent as it comes, and ``ctx.cancelled`` asks the parent.

The child measures the model's size after loading (``backends.memory.measure_mib``: on a
CUDA device the growth of its own ``torch.cuda.memory_allocated``) and sends it with
the load's answer (``size_mib``); the parent never touches the model's device.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from .. import hostmem
from ..backends import create_backend
from ..backends.base import BackendError, Capabilities, JobCancelled, WorkItem, device_fault, model_capabilities
from ..backends.memory import load_and_measure

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from PIL.Image import Image

    from ..backends.base import StepContext
    from ..config import ModelConfig, Settings
    from ..training.lora_trainer import TrainContext
    from ..training.plan import TrainPlan

log = logging.getLogger(__name__)
STOP_TIMEOUT = 10.0
FAULT_EXIT = 70  # the child's exit code after a device fault
TOKEN_CACHE = 256  # prompts whose token counts a ModelProcess keeps


class ModelProcessLost(BackendError):
    """The model's process ended during a call (a device fault, or killed: for memory,
    or after a stalled job); the model host starts a new one."""


class _ChildContext:
    """The StepContext (and, for training, the JobContext) seen by the backend inside
    the child (see the module docstring for the step protocol)."""

    def __init__(self, conn: Connection, job_id: str = "") -> None:
        self.conn = conn
        self.job_id = job_id
        self._sent = 0  # the last step reported to the parent (0: none yet)
        self._answered = -1  # the last step the parent has answered (0: the call's start)
        self._previews: set[int] = set()  # the steps after which the parent wants a preview
        self._preview_step = 0  # the step a wanted preview is of
        self._cancelled = False
        self._reply: bool | None = None  # the answer to "cancelled?", until taken

    def _read(self) -> None:
        message = self.conn.recv()
        if message[0] == "answer":
            _, step, preview_next, cancelled = message
            self._answered = step
            if preview_next:
                self._previews.add(step + 1)
            self._cancelled = self._cancelled or cancelled
        else:  # ("reply", flag): the answer to "cancelled?"
            self._reply = bool(message[1])

    @property
    def cancelled(self) -> bool:
        self.conn.send(("cancelled?",))
        while self._reply is None:
            self._read()
        flag, self._reply = self._reply, None
        return flag

    def set_extra(self, **values: Any) -> None:
        self.conn.send(("extra", values))

    def step(self, i: int, total: int, at: float | None = None) -> None:
        self.conn.send(("step", i, total, time.monotonic() if at is None else at))
        previous, self._sent = self._sent, i
        while self._answered < previous or self.conn.poll():  # the answer to the previous step, and any newer
            self._read()
        if self._cancelled:
            raise JobCancelled()
        self._preview_step = i if i in self._previews else 0
        self._previews = {s for s in self._previews if s > i}

    def wants_preview(self, i: int) -> bool:
        return self._preview_step == i != 0

    def preview(self, image: Image, i: int | None = None) -> None:
        self.conn.send(("preview", self._preview_step if i is None else i, image))

    def finish(self) -> None:
        """Read the parent's answers to every step reported (before the next command)."""
        while self._answered < self._sent:
            self._read()


def _child_main(conn: Connection, name: str, cfg: ModelConfig, settings: Settings) -> None:
    hostmem.tune(settings.host_memory.retain_mib)
    backend = create_backend(name, cfg, settings)
    while True:
        try:
            command, payload = conn.recv()
        except EOFError:
            return
        try:
            if command == "load":
                conn.send(("done", load_and_measure(backend, name, cfg)))
            elif command == "run":
                ctx = _ChildContext(conn)
                try:
                    conn.send(("done", backend.run(payload, ctx)))
                finally:
                    ctx.finish()
            elif command == "run_batch":
                ctx = _ChildContext(conn)
                try:
                    conn.send(("done", backend.run_batch(payload, ctx)))  # type: ignore[attr-defined]
                finally:
                    ctx.finish()
            elif command == "train":
                from ..training.lora_trainer import LoraTrainer

                plan, job_id = payload
                ctx = _ChildContext(conn, job_id)
                try:
                    conn.send(("done", LoraTrainer(plan).run(backend, ctx)))
                finally:
                    ctx.finish()
            elif command == "tokens":
                conn.send(("done", backend.count_tokens(payload)))
            elif command == "after_job":
                conn.send(("done", backend.after_job(payload)))
            elif command == "stop":
                backend.unload()
                conn.send(("done", None))
                return
        except JobCancelled as exc:
            conn.send(("cancelled", str(exc)))
        except BackendError as exc:
            conn.send(("backend_error", str(exc)))
        except Exception as exc:
            if device_fault(exc):  # CUDA's context is broken: every later call would fail too
                conn.send(("fault", f"{type(exc).__name__}: {str(exc)[:300]}"))
                conn.close()
                os._exit(FAULT_EXIT)
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))  # keep serving


class ModelProcess:
    """A Backend proxy whose model lives in its own process (see module docstring)."""

    isolated = True

    def __init__(self, name: str, cfg: ModelConfig, settings: Settings) -> None:
        self.name = name
        self.cfg = cfg
        self.settings = settings
        self.capabilities: Capabilities = model_capabilities(cfg)
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # one call at a time: the pipe is one conversation
        self.size_mib: float | None = None  # measured in the child after its load
        self._tokens: dict[str, tuple[int, int | None]] = {}  # prompt -> count_tokens' answer (this process's tokenizer)
        self._measures = True  # False once after_job answered None: it cannot measure here (not CUDA), so no more asking

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
        self._tokens.clear()
        self._measures = True
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

    def run_batch(self, items: list[WorkItem], ctx: StepContext) -> list[list[Image]]:
        """Compatible items in one call of the model in its process (``ctx``: the
        worker's ``BatchSteps``: one preview image per item comes through the pipe)."""
        if self._conn is None:
            raise BackendError(f"model {self.name!r} is not loaded; load it first")
        result: list[list[Image]] = self._call("run_batch", items, ctx)
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
        """The model's tokenizer lives in its process: ask it, once per prompt (a prompt
        run again with other seeds costs no round trip before its call)."""
        if (known := self._tokens.get(prompt)) is not None:
            return known
        if self._conn is None:
            raise BackendError(f"model {self.name!r} is not loaded; load it first")
        tokens, limit = self._call("tokens", prompt, None)
        if len(self._tokens) >= TOKEN_CACHE:
            self._tokens.pop(next(iter(self._tokens)))  # the oldest prompt
        self._tokens[prompt] = answer = (int(tokens), limit)
        return answer

    def after_job(self, release_cache: bool) -> float | None:
        """Measured in the model's process (its device, its allocator).  A process that
        answered None cannot measure (not on CUDA, where a cache release is a no-op
        too): it is not asked again, which saves a round trip between two jobs."""
        if self._conn is None or not self._measures:
            return None
        peak: float | None = self._call("after_job", release_cache, None)
        self._measures = peak is not None
        return peak

    def kill(self) -> None:
        """Kill the model's process now (a hung job, any thread): the ``run`` blocked on
        it raises ``BackendError`` and cleans up; ``load`` then starts a new process."""
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def _call(self, command: str, payload: Any, ctx: Any) -> Any:
        """Send ``command`` and serve the child's requests until its answer; ``ctx``: the
        job's context (the worker's JobContext: a StepContext, with ``set_extra`` for a
        training job) or None.  One call at a time (the lock)."""
        with self._lock:
            return self._converse(command, payload, ctx)

    def _converse(self, command: str, payload: Any, ctx: Any) -> Any:
        conn = self._conn
        if conn is None:
            raise ModelProcessLost(f"the process of model {self.name!r} is gone; it is being started again")
        cancelled = False

        def answer(i: int) -> None:  # after step i (0: the start): a preview after the next? cancelled?
            conn.send(("answer", i, ctx is not None and not cancelled and ctx.wants_preview(i + 1), cancelled))

        try:
            conn.send((command, payload))
            if command in ("run", "run_batch", "train"):
                answer(0)
            while True:
                kind, *rest = conn.recv()
                if kind == "step":
                    i, total, when = rest
                    if ctx is not None:
                        try:
                            ctx.step(i, total, when)
                        except JobCancelled:
                            cancelled = True
                    answer(i)
                elif kind == "preview" and ctx is not None:
                    ctx.preview(rest[1], rest[0])
                elif kind == "cancelled?":
                    conn.send(("reply", ctx is not None and ctx.cancelled))
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
                elif kind == "fault":
                    log.error("model process of %s: device fault, the process ends: %s", self.name, rest[0])
                    self._kill()
                    raise ModelProcessLost(
                        f"the device failed while model {self.name!r} ran this job ({rest[0]}); "
                        "its process was ended and is started again for the next job"
                    )
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            self._kill()
            raise ModelProcessLost(
                f"the process of model {self.name!r} exited unexpectedly (exit code {code}), probably killed for lack of "
                "memory; it is started again for the next job — try a smaller size, fewer images, or offload"
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
