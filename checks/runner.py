"""Run checks: concurrently where they are independent, in worker processes where they can hang or
crash, in one shared worker where they import torch. One bad check never takes the run down: it
becomes a ``fail`` (timeout) or an ``error`` (crash) and the rest go on.

How a run is laid out:

- a bounded pool of threads (``jobs``) runs the checks; each waits for the checks it ``needs``;
- in-process checks (file reads, HTTP, version probes) run in their thread;
- ``isolate=True`` checks get a fresh ``python -m checks.worker`` each;
- ``worker="torch"`` / ``worker="nvml"`` checks go to one persistent worker per name, one at a time,
  so torch is imported and the CUDA context created once per run, not once per check; a timeout or
  crash kills that worker and the next check starts a new one;
- ``exclusive=True`` checks (benchmarks, the fine-tune, DCGM's diagnostic) load the GPUs: they never
  run beside one another, so one's load cannot skew another's figures;
- results come back in the order the checks were given, whatever order they finished in.

Progress inside a check (``ctx.progress``, see :mod:`checks.registry`) reaches the run's ``events`` hook
from wherever the check runs: directly from the runner's threads, and from a worker as ``{"progress": ...}``
lines that :class:`WorkerClient` forwards while it waits for the reply.

Ctrl-C (KeyboardInterrupt in the thread that called :meth:`Run.execute`): no further check starts,
``ctx.interrupted`` is set for the checks still running, every worker is closed and every process the run
started is killed with its tree (shared and isolated workers, fine-tune workers, torchrun, commands of
in-process checks). Running checks get a few seconds to return; what finished before the interrupt is
kept as it is, the rest becomes ``skip: interrupted`` (a check that reported the interrupt itself, like
the fine-tune keeping its finished methods, keeps its own results). :class:`RunInterrupted` (a
KeyboardInterrupt) carries those results to the caller, which writes the reports.

Every child process goes through :mod:`checks.proc` (deadline, tree kill, exit description).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from checks import proc
from checks.registry import DEFAULT_TIMEOUT_S, INTERRUPTED, CheckSpec, Context, Progress, progress_to
from checks.result import GpuId, Result, Status, Value, Verdict, worst

ProgressHook = Callable[[CheckSpec, "list[Result] | None"], None]  # before (None) and after each check
EventHook = Callable[[CheckSpec, Progress], None]  # a running check's progress events
INTERRUPT_GRACE_S = 5.0  # how long running checks may take to return once the run is interrupted
DEFAULT_JOBS = 6
BLOCKED_PREFIX = "blocked by "  # a skip whose dependency failed: "blocked by gpu.driver (its message)"
CRASH_HINT = ("This is a bug in the check or an unexpected system state; rerun it alone "
              "(invoke verify --only <check>) and report the traceback.")


def verdicts_of(outcome) -> list[Verdict]:
    """A check returns one Verdict or a non-empty list of them."""
    if isinstance(outcome, Verdict):
        return [outcome]
    if isinstance(outcome, (list, tuple)) and outcome and all(isinstance(v, Verdict) for v in outcome):
        return list(outcome)
    raise TypeError(f"a check must return a Verdict or a non-empty list of Verdicts, not {type(outcome).__name__}")


def _error(spec: CheckSpec, message: str, started: float, remediation: str | None = None) -> Result:
    return Result(spec.name, spec.group, Status.ERROR, message, remediation=remediation,
                  duration_s=time.monotonic() - started)


def interrupted_result(spec: CheckSpec) -> Result:
    return Result(spec.name, spec.group, Status.SKIP, INTERRUPTED)


def reports_interrupt(results: list[Result]) -> bool:
    """The check noticed the interrupt itself and said which of its parts did not finish."""
    return any(r.status == Status.SKIP and r.message == INTERRUPTED for r in results)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``results`` holds what finished and ``skip: interrupted`` for the rest."""

    def __init__(self, results: list[Result]):
        super().__init__(INTERRUPTED)
        self.results = results


def run_in_process(spec: CheckSpec, ctx: Context) -> list[Result]:
    started = time.monotonic()
    try:
        with progress_to(ctx.sink):
            verdicts = verdicts_of(spec.load()(ctx))
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return [_error(spec, f"check crashed: {type(exc).__name__}: {exc} (at {Path(tb.filename).name}:{tb.lineno})",
                       started, CRASH_HINT)]
    duration = time.monotonic() - started
    return [Result.from_verdict(spec.name, spec.group, v, duration) for v in verdicts]


def _timeout_result(spec: CheckSpec, timeout_s: float, started: float) -> Result:
    return Result(spec.name, spec.group, Status.FAIL, f"timed out after {timeout_s:g} s and was killed",
                  measured={"elapsed": Value(round(time.monotonic() - started, 3), "s")},
                  expected={"timeout": Value(timeout_s, "s")},
                  remediation="Something on the node hangs (driver, GPU, NCCL, filesystem); run the "
                              "check alone with a longer --timeout to see whether it finishes.",
                  duration_s=time.monotonic() - started)


def results_of(spec: CheckSpec, payload: dict, duration: float) -> list[Result]:
    """A worker's reply as results."""
    if not payload.get("ok"):
        return [Result(spec.name, spec.group, Status.ERROR, f"check crashed: {payload.get('error')}",
                       remediation=CRASH_HINT, duration_s=duration)]
    out = []
    for v in payload["verdicts"]:
        verdict = Verdict(
            status=Status.parse(v["status"]), message=v["message"],
            measured={k: Value.from_dict(x) for k, x in v["measured"].items()},
            expected={k: Value.from_dict(x) for k, x in v["expected"].items()},
            remediation=v["remediation"], subject=v["subject"], gpu=GpuId.from_dict(v.get("gpu")),
        )
        out.append(Result.from_verdict(spec.name, spec.group, verdict, duration))
    return out


class WorkerClient:
    """One ``python -m checks.worker`` serving checks over a pipe, started on first use."""

    def __init__(self, name: str):
        self.name = name
        self.process: proc.Process | None = None
        self.lock = threading.Lock()

    def _start(self) -> proc.Process:
        self.process = proc.Process(proc.python_argv("-m", "checks.worker"), stdin="pipe", stdout="pipe")
        return self.process

    def _dead(self, spec: CheckSpec, started: float, timed_out: bool, timeout_s: float) -> list[Result]:
        if self.process is None:  # closed under it: the run was interrupted
            return [interrupted_result(spec)]
        if not timed_out:  # its pipe closed: let it finish dying so its exit status is known
            self.process.wait(proc.KILL_WAIT_S)
        ex = self.process.finish(timed_out=timed_out)
        self.process.close()
        self.process = None
        if timed_out:
            return [_timeout_result(spec, timeout_s, started)]
        last = ex.last_line() or "no output"
        if ex.signal:
            return [_error(spec, f"crashed with {ex.signal}", started,
                           f"The process died in native code (driver, CUDA, NCCL library); its last output: {last}")]
        return [_error(spec, f"worker exited with code {ex.code} without a result ({last})", started)]

    def call(self, spec: CheckSpec, ctx: Context, timeout_s: float) -> list[Result]:
        started = time.monotonic()
        if self.process is None or not self.process.alive():
            if self.process is not None:
                self.process.close()
            self._start()
        process = self.process
        try:
            process.send({"spec": dataclasses.asdict(spec), "context": ctx.to_dict()})
        except (BrokenPipeError, OSError):
            return self._dead(spec, started, False, timeout_s)
        deadline = started + timeout_s
        try:
            while True:
                reply = process.receive(max(0.0, deadline - time.monotonic()))
                if reply is None or "progress" not in reply:
                    break
                if ctx.sink is not None:  # a progress line before the reply: on to the run's display
                    ctx.progress(**Progress.from_dict(reply["progress"]).to_dict())
        except TimeoutError:
            return self._dead(spec, started, True, timeout_s)
        except BaseException:
            self.close()
            raise
        if reply is None:
            return self._dead(spec, started, False, timeout_s)
        return results_of(spec, reply, time.monotonic() - started)

    def close(self) -> None:
        """End the worker (its tree too). Safe to call from another thread and more than once."""
        process, self.process = self.process, None
        if process is None:
            return
        # Nothing in a worker needs a clean shutdown (a check's results are already back), and an
        # interpreter that imported torch takes ~0.5-1 s to exit by itself: end it now.
        process.finish(timed_out=True)
        process.close()


def run_isolated(spec: CheckSpec, ctx: Context, timeout_s: float,
                 live: set[WorkerClient] | None = None, lock: threading.Lock | None = None) -> list[Result]:
    """The check in a fresh worker process of its own (its own session: a timeout kills its children too).
    ``live``: where a run keeps its running workers (guarded by ``lock``), to end them when interrupted."""
    client = WorkerClient(f"isolated:{spec.name}")
    if live is not None:
        with lock:
            live.add(client)
    try:
        return client.call(spec, ctx, timeout_s)
    finally:
        client.close()
        if live is not None:
            with lock:
                live.discard(client)


def effective_timeout(spec: CheckSpec, override_s: float | None) -> float:
    """``--timeout`` overrides every check; otherwise the check's own timeout or the default."""
    if override_s is not None:
        return override_s
    return spec.timeout_s if spec.timeout_s is not None else DEFAULT_TIMEOUT_S


def _ordered(specs: list[CheckSpec]) -> list[CheckSpec]:
    """The specs with every check after the checks it needs (stable otherwise): a thread waiting for a
    dependency then always waits for one that was handed out before it."""
    names = {s.name for s in specs}
    placed: set[str] = set()
    out: list[CheckSpec] = []
    todo = list(specs)
    while todo:
        for i, s in enumerate(todo):
            if all(n in placed or n not in names for n in s.needs):
                out.append(todo.pop(i))
                placed.add(s.name)
                break
        else:
            cycle = ", ".join(s.name for s in todo)
            raise RuntimeError(f"checks that need each other: {cycle}")
    return out


def _first_problem(results: list[Result]) -> Result:
    return max(results, key=lambda r: int(r.status))


class Run:
    """One run of a list of checks (see the module docstring)."""

    def __init__(self, specs: Iterable[CheckSpec], ctx: Context, *, timeout_s: float | None = None,
                 progress: ProgressHook | None = None, jobs: int = DEFAULT_JOBS, fresh_workers: bool = False,
                 events: EventHook | None = None):
        self.specs = list(specs)
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.progress = progress
        self.events = events
        self.jobs = max(1, jobs)
        self.fresh_workers = fresh_workers
        self.workers: dict[str, WorkerClient] = {}
        self.gpu_lock = threading.Lock()
        self.hook_lock = threading.Lock()
        self.done: dict[str, threading.Event] = {s.name: threading.Event() for s in self.specs}
        self.results: dict[str, list[Result]] = {}
        self.root: dict[str, str] = {}  # check -> the failed check that blocked it (itself when it failed)
        self.cancelled = threading.Event()  # the run was interrupted (the checks see it as ctx.interrupted)
        self.isolated: set[WorkerClient] = set()

    def _hook(self, spec: CheckSpec, results: list[Result] | None) -> None:
        if self.progress:
            with self.hook_lock:
                self.progress(spec, results)

    def _sink(self, spec: CheckSpec):
        """Where ``spec``'s progress goes: the run's events hook, one event at a time, none once it finished."""
        if self.events is None:
            return None
        finished = self.done[spec.name]

        def sink(event: Progress) -> None:
            if finished.is_set():
                return
            with self.hook_lock:
                self.events(spec, event)

        return sink

    def _blocked(self, spec: CheckSpec) -> Result | None:
        for dep in spec.needs:
            if dep not in self.done:
                continue  # not part of this run
            self.done[dep].wait()
            root = self.root.get(dep)
            if root is None:
                continue
            reason = _first_problem(self.results[root])
            via = f" via {dep}" if root != dep else ""
            return Result(spec.name, spec.group, Status.SKIP,
                          f"{BLOCKED_PREFIX}{root}{via} ({reason.message})",
                          expected={"needs": Value(", ".join(spec.needs))})
        return None

    def _execute(self, spec: CheckSpec) -> list[Result]:
        if self.ctx.quick and spec.slow:
            return [Result(spec.name, spec.group, Status.SKIP, "skipped by --quick (long-running check)")]
        if spec.needs_gpus and self.ctx.node.gpus == 0:
            return [Result(spec.name, spec.group, Status.SKIP, "this node is expected to have no GPUs (node.gpus = 0)",
                           expected={"gpus": Value(0)})]
        blocked = self._blocked(spec)
        if blocked is not None:
            return [blocked]
        if self.cancelled.is_set():
            return [interrupted_result(spec)]
        timeout = effective_timeout(spec, self.timeout_s)
        ctx = self.ctx.bound(self._sink(spec), self.cancelled)
        with self.gpu_lock if spec.exclusive else _NO_LOCK:
            if self.cancelled.is_set():  # interrupted while it waited for the GPUs
                return [interrupted_result(spec)]
            self._hook(spec, None)
            if spec.worker and not self.fresh_workers:
                client = self.workers[spec.worker]
                with client.lock:
                    return client.call(spec, ctx, timeout)
            if spec.out_of_process:
                return run_isolated(spec, ctx, timeout, self.isolated, self.hook_lock)
            return run_in_process(spec, ctx)

    def _task(self, spec: CheckSpec) -> None:
        try:
            got = self._execute(spec)
        except BaseException as exc:  # never leave dependants waiting
            got = [Result(spec.name, spec.group, Status.ERROR, f"runner failed: {type(exc).__name__}: {exc}")]
        if self.cancelled.is_set() and not reports_interrupt(got):
            got = [interrupted_result(spec)]  # ended by the interrupt (its worker killed): not a result
        self.results[spec.name] = got
        if worst(r.status for r in got) >= Status.ERROR:
            self.root[spec.name] = spec.name
        elif got and is_blocked(got[0]):
            blocker = next((d for d in spec.needs if d in self.root), None)
            if blocker is not None:
                self.root[spec.name] = self.root[blocker]
        self.done[spec.name].set()
        self._hook(spec, got)

    def _serve(self, todo: queue.SimpleQueue, left: list[int], all_done: threading.Event) -> None:
        try:
            while not self.cancelled.is_set():
                try:
                    spec = todo.get_nowait()
                except queue.Empty:
                    return
                self._task(spec)
        finally:
            with self.hook_lock:
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()

    def _interrupt(self, spared: set[int]) -> None:
        """Stop starting checks, tell the running ones, and end every process the run started."""
        self.cancelled.set()
        for event in self.done.values():  # a check waiting for one that will never run: let it see the interrupt
            event.set()
        with self.hook_lock:
            live = [*self.workers.values(), *self.isolated]
        for client in live:
            client.close()
        proc.end_children(spared)

    def _collect(self) -> list[Result]:
        return [r for s in self.specs for r in (self.results.get(s.name) or [interrupted_result(s)])]

    def execute(self) -> list[Result]:
        for spec in self.specs:
            if spec.worker and spec.worker not in self.workers:
                self.workers[spec.worker] = WorkerClient(spec.worker)
        todo: queue.SimpleQueue[CheckSpec] = queue.SimpleQueue()
        for spec in _ordered(self.specs):
            todo.put(spec)
        spared = proc.child_pids()  # what this process had started before the run is not the run's to end
        # Daemon threads: a check that ignores the interrupt cannot keep the process from exiting. Waited for
        # through an Event, not Thread.join: a join that Ctrl-C interrupts can leave the thread marked as
        # ended while it still runs (CPython's bpo-45274 handling), and its results would be lost.
        count = min(self.jobs, len(self.specs))
        left, all_done = [count], threading.Event()
        threads = [threading.Thread(target=self._serve, args=(todo, left, all_done), name=f"peftnode-check-{i}",
                                    daemon=True) for i in range(count)]
        if not threads:
            all_done.set()
        try:
            for t in threads:
                t.start()
            while not all_done.wait(0.2):
                pass
        except KeyboardInterrupt:
            self._interrupt(spared)
            try:
                all_done.wait(INTERRUPT_GRACE_S)
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for them
                pass
            raise RunInterrupted(self._collect()) from None
        except BaseException:
            self._interrupt(spared)
            raise
        finally:
            for client in self.workers.values():
                client.close()
        return self._collect()


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()


def run_checks(specs: Iterable[CheckSpec], ctx: Context, *, timeout_s: float | None = None,
               progress: ProgressHook | None = None, jobs: int = DEFAULT_JOBS,
               fresh_workers: bool = False, events: EventHook | None = None) -> list[Result]:
    """Run the checks; their results in the given order. Raises :class:`RunInterrupted` on Ctrl-C."""
    return Run(specs, ctx, timeout_s=timeout_s, progress=progress, jobs=jobs, fresh_workers=fresh_workers,
               events=events).execute()


def is_blocked(result: Result) -> bool:
    """Skipped because a check it needs failed (not a skip of its own)."""
    return result.status == Status.SKIP and result.message.startswith(BLOCKED_PREFIX)


def blocked_roots(results: list[Result]) -> dict[str, int]:
    """How many results each failed check blocked (for the summary: one root cause, not N failures)."""
    counts: dict[str, int] = {}
    for r in results:
        if is_blocked(r):
            root = r.message[len(BLOCKED_PREFIX):].split(" ", 1)[0]
            counts[root] = counts.get(root, 0) + 1
    return counts
