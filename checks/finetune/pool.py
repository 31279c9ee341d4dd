"""Spread methods over worker processes: one per GPU (one on a CPU-only node), fed one method at a time.

Each worker pays the heavy imports and the model load once. A method that hangs past its timeout
gets its worker killed and is reported ``fail`` (``timeout``); a method whose worker dies is reported
``error`` (``crash``) with the worker's last log line. Either way the slot starts a fresh worker for
the next method, so one bad method never takes the others down. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from checks.finetune.model import ModelSpec

FAULTS_ENV = "PEFTNODE_FINETUNE_FAULTS"  # test hook: "lora:hang,ia3:crash,prompt_tuning:corrupt_adapter"
DEFAULT_STEPS = 30
DEFAULT_TIMEOUT_S = 600.0  # per method; a bloomz-560m method takes seconds on a GPU, minutes on a CPU
MAX_START_FAILURES = 2  # consecutive worker start failures on one slot before its queue is given up
EXIT_WAIT_S = 10.0


class WorkerDied(Exception):
    pass


class WorkerTimeout(Exception):
    pass


class LoadFailed(Exception):
    """The worker started but could not build or load the model (deterministic: no retry)."""


def parse_faults(text: str | None) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for item in (text or "").split(","):
        method, _, fault = item.strip().partition(":")
        if method and fault:
            out.setdefault(method.strip(), set()).add(fault.strip())
    return out


def gpu_slots() -> list[str | None]:
    """One entry per GPU this process may use (CUDA_VISIBLE_DEVICES, else the driver's GPU list), or
    ``[None]`` for a single CPU worker. Reads no CUDA library: cheap and safe in the parent."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [t.strip() for t in visible.split(",") if t.strip()]
        return ids if ids and ids[0] != "-1" else [None]
    try:
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        count = 0
    return [str(i) for i in range(count)] or [None]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class WorkerProcess:
    """One ``python -m checks.finetune.worker`` and its JSON-lines channel."""

    def __init__(self, gpu: str | None, allow_download: bool = False):
        self.gpu = gpu
        self.workdir = tempfile.mkdtemp(prefix="peftnode-finetune-")
        self.log_path = os.path.join(self.workdir, "worker.log")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path)),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        # OpenMP threads that spin while waiting slow training ~10x when other processes share the CPUs.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if not allow_download:  # never reach the hub at run time unless asked to
            env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "checks.finetune.worker", self.workdir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self._buf = b""
        self.hello: dict = {}
        self.loaded: dict = {}

    def send(self, message: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.proc.wait()
            raise WorkerDied(self.death()) from None

    def receive(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout(f"no answer within {timeout_s:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.proc.wait()
                raise WorkerDied(self.death())
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def log_tail(self, lines: int = 1) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.log_path) - 8192))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        rows = [r.strip() for r in text.splitlines() if r.strip()]
        return " | ".join(rows[-lines:])

    def death(self) -> str:
        code = self.proc.returncode
        how = f"killed by {_signal_name(-code)}" if code is not None and code < 0 else f"exited with code {code}"
        tail = self.log_tail()
        return how + (f"; last output: {tail}" if tail else "")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._cleanup()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "exit"})
                self.proc.wait(timeout=EXIT_WAIT_S)
            except (WorkerDied, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _cleanup(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class PoolRun:
    results: list[dict]  # one per requested method, in the requested order
    workers: list[dict] = field(default_factory=list)  # hello + loaded facts of every worker started
    restarts: int = 0
    wall_s: float = 0.0


def _failure(name: str, status: str, assertion: str, message: str, elapsed: float) -> dict:
    return {"method": name, "status": status, "message": message, "failed": [assertion],
            "assertions": {assertion: {"ok": False, "detail": message}}, "metrics": {"wall_s": round(elapsed, 3)}}


def run_methods(names: list[str], model: ModelSpec, *, steps: int = DEFAULT_STEPS,
                timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float | None = None, lr: float | None = None,
                faults: dict[str, set[str]] | None = None, max_workers: int | None = None,
                progress: Callable[[dict], None] | None = None) -> PoolRun:
    """Run every method in ``names`` on ``model`` and return their results (see run.run_method)."""
    started = time.monotonic()
    faults = faults if faults is not None else parse_faults(os.environ.get(FAULTS_ENV))
    start_timeout_s = start_timeout_s or max(timeout_s, 300.0)
    slots = gpu_slots()
    if max_workers:
        slots = slots[:max(1, max_workers)]
    slots = slots[:max(1, len(names))]
    todo: queue.Queue[str] = queue.Queue()
    for name in names:
        todo.put(name)
    results: dict[str, dict] = {}
    run = PoolRun(results=[])
    lock = threading.Lock()
    live: set[WorkerProcess] = set()

    def record(result: dict) -> None:
        with lock:
            results[result["method"]] = result
        if progress:
            progress(result)

    def start(gpu: str | None) -> WorkerProcess:
        worker = WorkerProcess(gpu, model.allow_download)
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
            stop(worker, kill=True)
            raise
        with lock:
            run.workers.append({"gpu": gpu, **worker.hello, **worker.loaded})
        return worker

    def stop(worker: WorkerProcess, kill: bool = False) -> None:
        (worker.kill if kill else worker.close)()
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
            record(_failure(name, "error", "worker_start", message, 0.0))

    def slot_loop(index: int, gpu: str | None) -> None:
        worker: WorkerProcess | None = None
        start_failures = 0
        try:
            while True:
                if worker is not None and gpu is not None and not worker.hello.get("cuda") and index > 0:
                    return  # torch sees no GPU although the driver lists some: leave the rest to slot 0
                try:
                    name = todo.get_nowait()
                except queue.Empty:
                    return
                t0 = time.monotonic()
                if worker is None:
                    try:
                        worker = start(gpu)
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
                        record(_failure(name, "error", "worker_start", message, time.monotonic() - t0))
                        continue
                t0 = time.monotonic()
                request = {"op": "run", "method": name, "steps": steps, "lr": lr,
                           "faults": sorted(faults.get(name, ()))}
                try:
                    worker.send(request)
                    reply = worker.receive(timeout_s)
                except WorkerTimeout:
                    stop(worker, kill=True)
                    worker = None
                    with lock:
                        run.restarts += 1
                    record(_failure(name, "fail", "timeout",
                                    f"timed out after {timeout_s:g} s; its worker was killed and a fresh one runs "
                                    f"the next method", time.monotonic() - t0))
                    continue
                except WorkerDied as exc:
                    stop(worker, kill=True)
                    worker = None
                    with lock:
                        run.restarts += 1
                    record(_failure(name, "error", "crash",
                                    f"the worker crashed while running it ({exc}); a fresh one runs the next method",
                                    time.monotonic() - t0))
                    continue
                elapsed = time.monotonic() - t0
                if reply.get("event") == "result":
                    result = reply["result"]
                    result.setdefault("metrics", {})["elapsed_s"] = round(elapsed, 3)
                    result["gpu"] = gpu
                    record(result)
                else:
                    record(_failure(name, "error", "worker_error",
                                    f"the worker could not run it: {reply.get('message', reply)}", elapsed))
        finally:
            if worker is not None:
                stop(worker)

    threads = [threading.Thread(target=slot_loop, args=(i, gpu), name=f"finetune-slot-{i}", daemon=True)
               for i, gpu in enumerate(slots)]
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
            worker.kill()
    for name in names:  # anything a thread could not record (should not happen) is an error, not a gap
        if name not in results:
            results[name] = _failure(name, "error", "not_run", "no worker ran this method", 0.0)
    run.results = [results[n] for n in names]
    run.wall_s = round(time.monotonic() - started, 3)
    return run


def _expect(reply: dict, event: str) -> dict:
    if reply.get("event") != event:
        raise WorkerDied(f"expected {event!r} from the worker, got {reply.get('event')!r}: "
                         f"{reply.get('message', '')}")
    return {k: v for k, v in reply.items() if k != "event"}
