"""Which checks exist, by group, and how a run picks them (``--only``, ``--skip``, ``--quick``).

A check is a function ``f(ctx) -> Verdict | list[Verdict]`` registered with :func:`check`. It calls
a thin probe (the system) and a pure judge (the rules), so the judge can be unit-tested on captured
data. Checks that can hang or crash (CUDA, NCCL, training) are registered ``isolate=True`` and run in
a worker process with a timeout; the torch checks share one persistent worker (``worker="torch"``) that
imports torch and creates the CUDA context once.

Dependencies: ``needs=("gpu.driver",)`` makes a check wait for those checks and report
``skip: blocked by gpu.driver (<its message>)`` when one of them failed or errored, so a run counts one
root cause, not every check it took down. ``needs_gpus=True`` skips the check on a node expected to
have no GPUs. A dependency that is not part of the run (``--only``) does not block.

Progress: a check says what it is doing with ``ctx.progress("step 12/30 loss 5.91", done=12, total=30,
key="lora")`` wherever it runs (the runner's process, a shared or isolated worker, any thread of either);
code below a check that has no ``ctx`` (a probe) calls :func:`current_progress` in the check's thread.
Where nobody listens (a test calling the check directly) it does nothing. ``ctx.interrupted`` is set when
the run is interrupted (Ctrl-C): a check that supervises long work of its own (the fine-tune) stops it and
reports what it did not finish as ``skip`` with the message :data:`INTERRUPTED`.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from checks.node import Node

# Modules whose import registers checks, in report order.
CHECK_MODULES = (
    "checks.system", "checks.python", "checks.gpu", "checks.dcgm", "checks.cuda", "checks.nccl", "checks.perf",
    "checks.jupyter", "checks.finetune",
)

DEFAULT_TIMEOUT_S = 120.0
INTERRUPTED = "interrupted"  # the message of a check (or part of one) that an interrupted run did not finish


class UsageError(Exception):
    """Bad flags or configuration: the CLI prints it on one line and exits 2."""


# Persistent workers a check may name: one process each, started on first use, serving its checks one
# after another (a timeout or crash kills it; the next check gets a fresh one).
WORKERS = {
    "torch": "imports torch and creates the CUDA context once for cuda.torch, perf.* and nccl.allreduce",
    "nvml": "initialises NVML once for the gpu.* health checks",
}


@dataclass(frozen=True)
class CheckSpec:
    name: str  # "<group>.<what>", unique
    group: str
    title: str  # one line for --list and reports
    target: str  # "module:function", importable in a worker process
    isolate: bool = False  # run in a fresh worker process of its own (hang/crash-prone)
    timeout_s: float | None = None  # own timeout; None = the run's default
    slow: bool = False  # skipped by --quick (long benchmarks, fine-tunes)
    worker: str | None = None  # run in this persistent worker (WORKERS) instead
    needs: tuple[str, ...] = ()  # checks that must not have failed for this one to run
    needs_gpus: bool = False  # skip on a node expected to have no GPUs
    exclusive: bool = False  # loads the GPUs: never runs beside another exclusive check

    @property
    def out_of_process(self) -> bool:
        return self.isolate or self.worker is not None

    def load(self) -> Callable[[Context], Any]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


@dataclass(frozen=True)
class Progress:
    """One progress event of a running check.

    ``key`` names what inside the check it is about (a method, a GPU, a rank): displays keep the latest
    event per key. ``done``/``total`` with ``0 < done < total`` make it a *step*, which a log may thin out
    (start, finish and plain messages are never thinned). ``final``: the last event of its key."""

    message: str
    done: float | None = None
    total: float | None = None
    key: str | None = None
    final: bool = False

    @property
    def step(self) -> bool:
        return (not self.final and self.done is not None and self.total is not None
                and 0 < self.done < self.total)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Progress:
        return cls(str(data.get("message", "")), data.get("done"), data.get("total"), data.get("key"),
                   bool(data.get("final")))


ProgressSink = Callable[[Progress], None]
_CURRENT: ContextVar[ProgressSink | None] = ContextVar("peftnode_progress", default=None)


def _emit(sink: ProgressSink | None, message: str, done, total, key, final) -> None:
    if sink is None:
        return
    try:
        sink(Progress(message, done, total, key, final))
    except Exception:  # showing progress must never fail a check
        pass


def current_progress() -> Callable[..., None]:
    """``emit(message, *, done=None, total=None, key=None, final=False)`` for the check running in this
    thread (a no-op outside one). Call it in the check's thread and hand the function to threads it starts."""
    sink = _CURRENT.get()

    def emit(message: str, *, done=None, total=None, key: str | None = None, final: bool = False) -> None:
        _emit(sink, message, done, total, key, final)

    return emit


@contextmanager
def progress_to(sink: ProgressSink | None) -> Iterator[None]:
    """Within the block, :func:`current_progress` in this thread reports to ``sink`` (the runner and the
    workers set it around each check)."""
    token = _CURRENT.set(sink)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@dataclass
class Context:
    """What every check may read: the stack, this node's expectations and the run's options.
    Plain data only, so it crosses into worker processes as JSON (``sink`` and ``interrupted`` stay in the
    process: each side binds its own)."""

    stack: dict
    node: Node = field(default_factory=Node)
    quick: bool = False
    options: dict = field(default_factory=dict)
    sink: ProgressSink | None = field(default=None, repr=False, compare=False)
    interrupted: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.node, dict):  # a plain node: mapping (tests, callers building a context by hand)
            self.node = Node.from_dict(self.node)

    def progress(self, message: str, *, done=None, total=None, key: str | None = None, final: bool = False) -> None:
        """Tell the run what this check is doing now (thread-safe; nothing happens where nobody listens)."""
        _emit(self.sink, message, done, total, key, final)

    def bound(self, sink: ProgressSink | None, interrupted: threading.Event | None = None) -> Context:
        """This context for one check: its progress goes to ``sink``."""
        return dataclasses.replace(self, sink=sink, interrupted=interrupted or self.interrupted)

    def to_dict(self) -> dict:
        return {"stack": self.stack, "node": self.node.to_dict(), "quick": self.quick, "options": self.options}

    @classmethod
    def from_dict(cls, data: dict) -> Context:
        return cls(data["stack"], Node.from_dict(data["node"]), bool(data.get("quick")),
                   dict(data.get("options") or {}))


_REGISTRY: dict[str, CheckSpec] = {}


def check(name: str, title: str, *, isolate: bool = False, timeout_s: float | None = None, slow: bool = False,
          worker: str | None = None, needs: tuple[str, ...] = (), needs_gpus: bool = False, exclusive: bool = False):
    """Register ``f`` as the check ``name`` (``group.what``)."""
    if worker is not None and worker not in WORKERS:
        raise RuntimeError(f"check {name!r}: unknown worker {worker!r} (known: {', '.join(WORKERS)})")

    def register(func):
        group = name.split(".", 1)[0]
        spec = CheckSpec(name, group, title, f"{func.__module__}:{func.__name__}", isolate, timeout_s, slow,
                         worker, tuple(needs), needs_gpus, exclusive)
        if name in _REGISTRY and _REGISTRY[name].target != spec.target:
            raise RuntimeError(f"check {name!r} registered twice ({_REGISTRY[name].target}, {spec.target})")
        _REGISTRY[name] = spec
        return func

    return register


def all_checks() -> list[CheckSpec]:
    for module in CHECK_MODULES:
        importlib.import_module(module)
    def rank(spec: CheckSpec) -> int:  # by the listed module (or package) the check lives in
        module = spec.target.partition(":")[0]
        return next((i for i, m in enumerate(CHECK_MODULES) if module == m or module.startswith(m + ".")),
                    len(CHECK_MODULES))

    return sorted(_REGISTRY.values(), key=rank)


def _split(values: list[str] | str | None) -> list[str]:
    if not values:
        return []
    if isinstance(values, str):
        values = [values]
    return [tok.strip() for v in values for tok in v.split(",") if tok.strip()]


def select(specs: list[CheckSpec], only=None, skip=None) -> list[CheckSpec]:
    """Checks named by ``only`` (groups or check names; all when empty) minus those named by ``skip``.
    An unknown name is a UsageError that lists what is accepted."""
    groups = sorted({s.group for s in specs})
    names = {s.name for s in specs}

    def expand(tokens: list[str], flag: str) -> set[str]:
        picked: set[str] = set()
        for tok in tokens:
            if tok in groups:
                picked.update(s.name for s in specs if s.group == tok)
            elif tok in names:
                picked.add(tok)
            else:
                from checks.stack import quote  # here: a bare node's Python may lack yaml
                raise UsageError(
                    f"{flag}: unknown check or group {quote(tok)} (groups: {', '.join(groups)}; "
                    f"checks: see 'invoke verify --list')"
                )
        return picked

    wanted = expand(_split(only), "--only") if _split(only) else names
    wanted -= expand(_split(skip), "--skip")
    return [s for s in specs if s.name in wanted]
