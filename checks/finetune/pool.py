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
from checks.finetune import verdict as V
from checks.finetune.model import ModelSpec
from checks.result import Status, Verdict

DEFAULT_STEPS = 30
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
            reply = self.process.receive(timeout_s)
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


def run_methods(names: list[str], model: ModelSpec, *, steps: int = DEFAULT_STEPS,
                timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float | None = None, lr: float | None = None,
                max_workers: int | None = None, progress: Callable[[Verdict], None] | None = None) -> PoolRun:
    """Run every method in ``names`` on ``model``: one verdict per method (see run.run_method)."""
    started = time.monotonic()
    start_timeout_s = start_timeout_s or max(timeout_s, 300.0)
    hint = V.rerun_hint(model.name)
    slots = worker_slots(len(names), model, max_workers)
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
        if progress:
            progress(verdict)

    def fail(name: str, status: Status, assertion: str, message: str, elapsed: float) -> None:
        outcome = V.failure(name, status, assertion, message, elapsed)
        record(outcome.verdict(hint), outcome.details())

    def start(slot: Slot) -> WorkerProcess:
        worker = WorkerProcess(slot, model.allow_download)
        with lock:
            live.add(worker)
        try:
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
        return worker

    def stop(worker: WorkerProcess) -> None:
        worker.close()
        with lock:
            live.discard(worker)

    def drain(first: str, message: str) -> None:
        pending = [first]
        while True:
            try:
                pending.append(todo.get_nowait())
            except queue.Empty:
                break
        for name in pending:
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
                t0 = time.monotonic()
                if worker is None:
                    try:
                        worker = start(slot)
                        start_failures = 0
                    except LoadFailed as exc:
                        drain(name, f"the model could not be loaded: {exc}")
                        return
                    except (WorkerDied, WorkerTimeout) as exc:
                        start_failures += 1
                        message = f"the worker could not start: {exc}"
                        if start_failures >= MAX_START_FAILURES:
                            drain(name, message)
                            return
                        fail(name, Status.ERROR, "worker_start", message, time.monotonic() - t0)
                        continue
                t0 = time.monotonic()
                try:
                    worker.send({"op": "run", "method": name, "steps": steps, "lr": lr})
                    reply = worker.receive(timeout_s)
                except WorkerTimeout:
                    stop(worker)
                    worker = None
                    with lock:
                        run.restarts += 1
                    fail(name, Status.FAIL, "timeout", f"timed out after {timeout_s:g} s; its worker was killed and "
                                                       f"a fresh one runs the next method", time.monotonic() - t0)
                    continue
                except WorkerDied as exc:
                    stop(worker)
                    worker = None
                    with lock:
                        run.restarts += 1
                    fail(name, Status.ERROR, "crash", f"its worker died while running it ({exc}); a fresh one runs "
                                                      f"the next method", time.monotonic() - t0)
                    continue
                if reply.get("event") == "result":
                    record(V.from_dict(reply["verdict"]), reply.get("details") or {})
                else:
                    fail(name, Status.ERROR, "worker_error", f"the worker could not run it: "
                                                             f"{reply.get('message', reply)}", time.monotonic() - t0)
        finally:
            if worker is not None:
                stop(worker)

    threads = [threading.Thread(target=slot_loop, args=(i, slot), name=f"finetune-slot-{i}", daemon=True)
               for i, slot in enumerate(slots)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    finally:
        with lock:
            leftover = list(live)
        for worker in leftover:
            worker.close()
    for name in names:  # anything a thread could not record (should not happen) is an error, not a gap
        if name not in verdicts:
            fail(name, Status.ERROR, "not_run", "no worker ran this method", 0.0)
    run.verdicts = [verdicts[n] for n in names]
    run.wall_s = round(time.monotonic() - started, 3)
    return run


def _expect(reply: dict, event: str) -> dict:
    if reply.get("event") != event:
        raise WorkerDied(f"expected {event!r} from the worker, got {reply.get('event')!r}: "
                         f"{reply.get('message', '')}")
    return {k: v for k, v in reply.items() if k != "event"}
