"""Spread methods over worker processes, fed one method at a time; each method comes back as a Verdict.

Where the workers run: one per GPU on a GPU node. On a node without GPUs, two single-threaded
workers for the tiny model (its methods are too small for more than one CPU thread to pay off, and
the second worker halves the run while its own import overlaps the first's), one worker with every
CPU for a real model (each holds the base model and a copy per method: gigabytes at bloomz-560m).
``max_workers`` (``--workers``) changes the count; the CPUs are shared out between them.

Each worker pays the heavy imports and the model load once. A method that hangs past its timeout
gets its worker's process tree killed and is reported ``fail`` (``timeout``); a method whose worker
dies is reported ``error`` (``crash``) with the signal and the worker's last log line. Either way the
slot starts a fresh worker for the next method, so one bad method never takes the others down.
Workers are started and ended through :mod:`checks.proc`. Nothing here imports torch.

Progress (``progress``, called like ``ctx.progress``): a worker starting and ready, each method started,
its training steps as the worker reports them (``lora: step 12/30 loss 5.912``) and its outcome
(``[1/3] lora: pass (2.31 s)``). ``cancelled`` (the run's Ctrl-C): every worker's tree is killed at once,
methods that finished keep their verdicts, the others are ``skip: interrupted``.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from checks import proc
from checks.finetune import budget
from checks.finetune import verdict as V
from checks.finetune.model import ModelSpec
from checks.registry import INTERRUPTED
from checks.result import Status, Verdict

DEFAULT_STEPS = budget.DEFAULT_STEPS  # tiny and GPU runs; full-size models on the CPU: budget.CPU_STEPS
DEFAULT_TIMEOUT_S = 600.0  # per method; a bloomz-560m method takes seconds on a GPU, minutes on a CPU
MAX_START_FAILURES = 2  # consecutive worker start failures on one slot before its queue is given up
EXIT_WAIT_S = 10.0  # a worker that closed its channel: how long it may take to finish dying
CPU_WORKERS_TINY = 2


class WorkerDied(Exception):
    pass


class WorkerTimeout(Exception):
    pass


class LoadFailed(Exception):
    """The worker started but could not build or load the model (deterministic: no retry)."""


def gpu_slots() -> list[str | None]:
    """One entry per GPU this process may use (CUDA_VISIBLE_DEVICES, else the driver's GPU list), or
    ``[None]`` when there is none. Reads no CUDA library: cheap and safe in the parent."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [t.strip() for t in visible.split(",") if t.strip()]
        return ids if ids and ids[0] != "-1" else [None]
    try:
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        count = 0
    return [str(i) for i in range(count)] or [None]


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: a GPU id, or None for the CPU with ``threads`` torch threads (None: torch's
    own default)."""

    gpu: str | None
    threads: int | None = None


def worker_slots(methods: int, model: ModelSpec, max_workers: int | None = None) -> list[Slot]:
    gpus = gpu_slots()
    if gpus != [None]:
        slots = [Slot(g) for g in gpus]
        return slots[:max(1, min(max_workers or len(slots), methods))]
    cpus = usable_cpus()
    count = max_workers or (min(CPU_WORKERS_TINY, cpus) if model.kind == "tiny" else 1)
    count = max(1, min(count, methods))
    return [Slot(None, max(1, cpus // count))] * count


class WorkerProcess:
    """One ``python -m checks.finetune.worker`` and its JSON-lines channel."""

    def __init__(self, slot: Slot, allow_download: bool = False):
        self.slot = slot
        self.workdir = tempfile.mkdtemp(prefix="peftnode-finetune-")
        extra = {}
        if slot.gpu is not None:
            extra["CUDA_VISIBLE_DEVICES"] = slot.gpu
        if slot.threads and "OMP_NUM_THREADS" not in os.environ:  # an operator's setting wins
            extra["OMP_NUM_THREADS"] = str(slot.threads)
        self.process = proc.Process(proc.python_argv("-m", "checks.finetune.worker", self.workdir),
                                    env=proc.child_env(extra, allow_download=allow_download),
                                    log_path=os.path.join(self.workdir, "worker.log"), stdin="pipe", stdout="pipe")
        self.hello: dict = {}
        self.loaded: dict = {}

    def send(self, message: dict) -> None:
        try:
            self.process.send(message)
        except (BrokenPipeError, OSError):
            raise WorkerDied(self.death()) from None

    def receive(self, timeout_s: float) -> dict:
        try:
            reply = self.process.receive(max(0.0, timeout_s))
        except TimeoutError as exc:
            raise WorkerTimeout(str(exc)) from None
        if reply is None:
            raise WorkerDied(self.death())
        return reply

    def death(self) -> str:
        """How the worker ended (it closed its channel): the signal or exit code, and its last output."""
        self.process.wait(EXIT_WAIT_S)
        ex = self.process.finish()
        how = ex.describe() if (ex.code is not None or ex.signal) else "closed its channel and was killed"
        last = ex.last_line()
        return how + (f"; last output: {last}" if last else "")

    def close(self) -> None:
        """End the worker's process tree and remove its scratch space. No polite exit first: a worker holds
        nothing its parent still needs, and a torch interpreter's own teardown takes seconds."""
        self.process.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class PoolRun:
    verdicts: list[Verdict]  # one per requested method, in the requested order (subject: the method)
    details: dict[str, dict] = field(default_factory=dict)  # method -> the assertions and figures behind it
    workers: list[dict] = field(default_factory=list)  # hello + loaded facts of every worker started
    restarts: int = 0
    wall_s: float = 0.0


def _quiet(message: str, **fields) -> None:
    pass


def run_methods(names: list[str], model: ModelSpec, *, steps: int | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float | None = None, lr: float | None = None,
                max_workers: int | None = None, progress: Callable[..., None] | None = None,
                cancelled: threading.Event | None = None, keep_dir: str | None = None) -> PoolRun:
    """Run every method in ``names`` on ``model``: one verdict per method (see run.run_method). ``steps`` None:
    each method's default (:func:`checks.finetune.budget.method_defaults`: 30, fewer for a full-size model on
    the CPU); ``lr`` None: the model's per-method rate, else the method's own. ``keep_dir``: keep each
    method's adapter, base and reload check there (:mod:`checks.finetune.keep`)."""
    started = time.monotonic()
    if keep_dir is not None:
        keep_dir = os.path.abspath(keep_dir)
        os.makedirs(keep_dir, exist_ok=True)
    emit = progress or _quiet
    cancelled = cancelled or threading.Event()
    start_timeout_s = start_timeout_s or max(timeout_s, 300.0)
    hint = V.rerun_hint(model.name)
    slots = worker_slots(len(names), model, max_workers)
    defaults = budget.plan_defaults(model, names, "cpu" if slots[0].gpu is None else "cuda", steps)
    todo: queue.Queue[str] = queue.Queue()
    for name in names:
        todo.put(name)
    verdicts: dict[str, Verdict] = {}
    run = PoolRun(verdicts=[])
    lock = threading.Lock()
    live: set[WorkerProcess] = set()

    def record(verdict: Verdict, details: dict) -> None:
        with lock:
            verdicts[verdict.subject] = verdict
            run.details[verdict.subject] = details
            count = len(verdicts)
        wall = verdict.measured.get("wall_s")
        took = f" ({wall.value:.2f} s)" if wall is not None and isinstance(wall.value, (int, float)) else ""
        emit(f"[{count}/{len(names)}] {verdict.subject}: {verdict.status.label}{took}", key=verdict.subject,
             final=True)

    def interrupted(name: str) -> None:
        record(Verdict(Status.SKIP, INTERRUPTED, subject=name), {})

    def fail(name: str, status: Status, assertion: str, message: str, elapsed: float) -> None:
        outcome = V.failure(name, status, assertion, message, elapsed)
        record(outcome.verdict(hint), outcome.details())

    def start(index: int, slot: Slot) -> WorkerProcess:
        where = f"GPU {slot.gpu}" if slot.gpu is not None else "the CPU" + (f", {slot.threads} thread(s)"
                                                                            if slot.threads else "")
        emit(f"worker {index}: starting on {where}", key=f"worker {index}")
        worker = WorkerProcess(slot, model.allow_download)
        with lock:
            live.add(worker)
        try:
            if cancelled.is_set():  # the run was interrupted while this one started: it is not closed yet
                raise WorkerDied(INTERRUPTED)
            worker.hello = _expect(worker.receive(start_timeout_s), "hello")
            worker.send({"op": "load", "model": model.to_dict()})
            reply = worker.receive(start_timeout_s)
            if reply.get("event") == "error":
                raise LoadFailed(reply.get("message", "unknown error"))
            worker.loaded = _expect(reply, "loaded")
        except BaseException:
            stop(worker)
            raise
        with lock:
            run.workers.append({"gpu": slot.gpu, **worker.hello, **worker.loaded})
        emit(f"worker {index}: ready (imports {worker.hello.get('import_s', 0):.1f} s, model "
             f"{worker.loaded.get('load_s', 0):.1f} s)", key=f"worker {index}", final=True)
        return worker

    def run_one(worker: WorkerProcess, name: str) -> dict:
        """Send the method, pass its step reports on, return its result (or error) reply."""
        own = defaults[name]
        emit(f"{name}: started", done=0, total=own.steps, key=name)
        worker.send({"op": "run", "method": name, "steps": own.steps, "lr": lr if lr is not None else own.lr,
                     "keep": keep_dir})
        deadline = time.monotonic() + timeout_s
        while True:
            reply = worker.receive(deadline - time.monotonic())
            if reply.get("event") != "step":
                return reply
            loss = reply.get("loss")
            said = f" loss {loss:.3f}" if isinstance(loss, (int, float)) else ""
            emit(f"{name}: step {reply.get('step')}/{reply.get('steps')}{said}", done=reply.get("step"),
                 total=reply.get("steps"), key=name)

    def stop(worker: WorkerProcess) -> None:
        worker.close()
        with lock:
            live.discard(worker)

    def drain(first: str, message: str | None) -> None:
        """``first`` and every method not handed out yet: failed with ``message``, or interrupted (None)."""
        pending = [first]
        while True:
            try:
                pending.append(todo.get_nowait())
            except queue.Empty:
                break
        for name in pending:
            if message is None:
                interrupted(name)
            else:
                fail(name, Status.ERROR, "worker_start", message, 0.0)

    def slot_loop(index: int, slot: Slot) -> None:
        worker: WorkerProcess | None = None
        start_failures = 0
        try:
            while True:
                if worker is not None and slot.gpu is not None and not worker.hello.get("cuda") and index > 0:
                    return  # torch sees no GPU although the driver lists some: leave the rest to slot 0
                try:
                    name = todo.get_nowait()
                except queue.Empty:
                    return
                if cancelled.is_set():
                    drain(name, None)
                    return
                t0 = time.monotonic()
                if worker is None:
                    try:
                        worker = start(index, slot)
                        start_failures = 0
                    except LoadFailed as exc:
                        drain(name, f"the model could not be loaded: {exc}")
                        return
                    except (WorkerDied, WorkerTimeout) as exc:
                        if cancelled.is_set():
                            drain(name, None)
                            return
                        start_failures += 1
                        message = f"the worker could not start: {exc}"
                        if start_failures >= MAX_START_FAILURES:
                            drain(name, message)
                            return
                        fail(name, Status.ERROR, "worker_start", message, time.monotonic() - t0)
                        continue
                t0 = time.monotonic()
                try:
                    reply = run_one(worker, name)
                except (WorkerDied, WorkerTimeout) as exc:
                    stop(worker)
                    worker = None
                    if cancelled.is_set():  # killed by the interrupt: not the method's failure
                        drain(name, None)
                        return
                    with lock:
                        run.restarts += 1
                    took = time.monotonic() - t0
                    if isinstance(exc, WorkerTimeout):
                        fail(name, Status.FAIL, "timeout", f"timed out after {timeout_s:g} s; its worker was killed "
                                                           f"and a fresh one runs the next method", took)
                    else:
                        fail(name, Status.ERROR, "crash", f"its worker died while running it ({exc}); a fresh one "
                                                          f"runs the next method", took)
                    continue
                if reply.get("event") == "result":
                    record(V.from_dict(reply["verdict"]), reply.get("details") or {})
                else:
                    fail(name, Status.ERROR, "worker_error", f"the worker could not run it: "
                                                             f"{reply.get('message', reply)}", time.monotonic() - t0)
        finally:
            if worker is not None:
                stop(worker)

    def stop_all() -> None:
        with lock:
            leftover = list(live)
        for worker in leftover:
            stop(worker)

    threads = [threading.Thread(target=slot_loop, args=(i, slot), name=f"finetune-slot-{i}", daemon=True)
               for i, slot in enumerate(slots)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                if cancelled.is_set():  # Ctrl-C: end every worker now; their slots record the interrupt
                    stop_all()
                t.join(0.1 if cancelled.is_set() else 0.5)
    finally:
        stop_all()
    for name in names:  # anything a thread could not record (should not happen) is an error, not a gap
        if name not in verdicts:
            if cancelled.is_set():
                interrupted(name)
            else:
                fail(name, Status.ERROR, "not_run", "no worker ran this method", 0.0)
    run.verdicts = [verdicts[n] for n in names]
    run.wall_s = round(time.monotonic() - started, 3)
    return run


def _expect(reply: dict, event: str) -> dict:
    if reply.get("event") != event:
        raise WorkerDied(f"expected {event!r} from the worker, got {reply.get('event')!r}: "
                         f"{reply.get('message', '')}")
    return {k: v for k, v in reply.items() if k != "event"}
