"""Per-model, per-method defaults of the smoke fine-tune, and what a planned run will cost.

The tiny model and every GPU run keep the defaults the fine-tune always had: :data:`DEFAULT_STEPS`
training steps per method at the seed notebooks' learning rate (``methods.SEED_LR``, 3e-2).

``random:bloomz-560m`` is different in two ways, both measured here (see ``benchmarks/finetune_560m_cpu.py``):

* **Learning rate.** With random weights and bloomz-560m's 250,880-word vocabulary the held-out loss
  starts at ln(250880) ≈ 12.4, and the seed's 3e-2 overshoots LoRA at small step counts (2 steps:
  12.38 -> 23.20). :data:`RANDOM_LR` holds the learning rate per method for such a model, on any
  device; a method not listed keeps the seed's.
* **Steps on the CPU.** A training step costs seconds there, and each method has a fixed cost on top
  (copying the 2.2 GB base twice, four held-out forward passes, the compare/reload/merge logits,
  generate). :data:`CPU_STEPS` gives each method the steps that finish the six seed methods well within
  :data:`CPU_GOAL_S` on 2 cores (5.1 min measured at load 0.4; 9.2 min while other work kept the load
  near 4) while every method's held-out loss still falls by 20 % or more.

A model directory whose ``config.json`` has a known shape (e.g. the stack's bloomz-560m) gets that
shape's CPU steps and cost figures; its learning rate stays the seed's (its weights are trained: the
random-weight figures say nothing about it). Steps the user gives (``--steps``) always win.

:func:`estimate` turns the measured costs (:data:`COSTS`) into the expected wall time and peak
memory of a planned run, so the CLI can say "about N min and M GiB" before a CPU run of the full
model starts. Only CPU runs of a measured shape get an estimate (the tiny model takes seconds; no GPU
was there to measure on). Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from checks.finetune.methods import SEED_LR
from checks.finetune.model import SHAPES, TINY, ModelSpec

DEFAULT_STEPS = 30  # tiny, and every GPU run (pool.DEFAULT_STEPS)
CPU_GOAL_S = 600.0  # the six seed methods of a shape in CPU_STEPS on 2 idle cores: at most this long
GIB = 1024 ** 3

# Learning rate per method for a random-weight model of this shape (any device). Measured on 2 CPU cores
# (held-out loss, relative drop at 2 steps: lr 3e-2 / 1e-2 / 3e-3 / 1e-3):
#   lora           -87 % / 74 % / 46 % / 13 %   (3e-2 overshoots: 12.38 -> 23.20)
#   adalora          5.1 % / 0.34 % / 0.02 % / 0.01 %
#   ia3             37 % / 14 % / 4.3 % / 1.4 %
#   prefix_tuning   79 % / 83 % / 78 % / 42 %
#   p_tuning        22 % / 21 % / 17 % / 10 %
#   prompt_tuning   18 % / 15 % / 7.5 % / 2.8 %
# At 8 steps: lora 1e-2 91 % (3e-3 86 %), adalora 3e-2 86 % (1e-1 89 % but its training loss jumps to 30-45),
# prefix_tuning 1e-2 93 %, ia3 3e-2 76 %. Chosen: the best 2-step drop without overshoot; the seed's lr where
# it already is (adalora, ia3, p_tuning, prompt_tuning).
RANDOM_LR: dict[str, dict[str, float]] = {
    "bloomz-560m": {"lora": 1e-2, "prefix_tuning": 1e-2},
}

# Training steps per method on a node without GPUs, by model shape. Relative held-out loss drop measured at these
# steps (and at 2): lora 88 % (74 %), adalora 86 % (5.1 %), ia3 67 % (37 %), prefix_tuning 91 % (83 %),
# p_tuning 27 % (22 %), prompt_tuning 22 % (18 %). AdaLoRA gets 8 so that its schedule (tinit = tfinal =
# steps // 5) has steps at both ends.
CPU_STEPS: dict[str, dict[str, int]] = {
    "bloomz-560m": {"lora": 6, "adalora": 8, "ia3": 6, "prefix_tuning": 6, "p_tuning": 6, "prompt_tuning": 6},
}
CPU_OTHER_STEPS = 8  # a method not in the shape's CPU_STEPS (e.g. from --methods all)


@dataclass(frozen=True)
class MethodCost:
    """One method on one worker: seconds outside training, seconds per training step, and the resident
    memory it adds on top of the worker's (both at the shape's measured thread count)."""

    fixed_s: float
    step_s: float
    extra_bytes: int


@dataclass(frozen=True)
class ShapeCost:
    """Measured costs of a model shape on the CPU with ``threads`` torch threads on an idle machine."""

    threads: int
    start_s: float  # worker imports + building/loading the model + the base's reference logits
    worker_bytes: int  # the worker's resident memory once the model is loaded
    methods: dict[str, MethodCost]
    other: MethodCost  # a method without its own figures
    measured: str  # where the figures come from


COSTS: dict[str, ShapeCost] = {
    # benchmarks/finetune_560m_cpu.py on 2 cores, load average 0.41 before the run (peft 0.21.2, transformers
    # 5.24.0, torch 2.13.0 CPU): fixed = the method's wall time minus its training time, step = training time /
    # steps (6, AdaLoRA 8), extra = the RSS the method added; start = the worker's imports + building the model;
    # the worker's RSS once loaded: 2.6 GiB (in one process, same steps).
    "bloomz-560m": ShapeCost(
        threads=2, start_s=13.0, worker_bytes=int(2.6 * GIB),
        methods={
            "lora": MethodCost(18.4, 4.27, int(4.62 * GIB)),
            "adalora": MethodCost(17.2, 3.80, int(4.78 * GIB)),
            "ia3": MethodCost(18.9, 3.78, int(4.68 * GIB)),
            "prefix_tuning": MethodCost(17.1, 5.09, int(4.42 * GIB)),
            "p_tuning": MethodCost(23.5, 6.58, int(4.09 * GIB)),
            "prompt_tuning": MethodCost(21.4, 4.85, int(4.35 * GIB)),
        },
        other=MethodCost(25.0, 6.6, int(4.8 * GIB)),  # the dearest seed method's figures, rounded up
        measured="benchmarks/finetune_560m_cpu.py, 2 cores, load 0.4"),
}

# How CPU time changes with the cores the worker gets: t(c) = t(m) * (m / c) ** PARALLEL for c >= m (the
# measured thread count), up to MAX_USEFUL_CPUS; t(m) * m / c below it. An assumption: only 2 cores were
# there to measure on.
PARALLEL = 0.7
MAX_USEFUL_CPUS = 16


@dataclass
class Defaults:
    """A method's steps and learning rate for one run (``lr`` None: the method's own, the seed's)."""

    steps: int
    lr: float | None = None


# --- which shape a model is --------------------------------------------------------------------


def _dims(config: dict) -> tuple[int | None, int | None, int | None]:
    hidden = config.get("hidden_size", config.get("n_embed"))
    layers = config.get("n_layer", config.get("num_hidden_layers"))
    return hidden, layers, config.get("vocab_size")


def shape_of(spec: ModelSpec) -> str | None:
    """The key of :data:`model.SHAPES` this model has: the tiny and random models by name, a directory by the
    dimensions in its ``config.json`` (read as JSON, no torch); None when unknown or unreadable."""
    if spec.kind in ("tiny", "random"):
        return spec.shape
    try:
        config = json.loads(Path(spec.path or "", "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wanted = _dims(config)
    for name, dims in SHAPES.items():
        if name != TINY and _dims(dims) == wanted:
            return name
    return None


def device_kind() -> str:
    """``cuda`` when the fine-tune's workers will get a GPU, else ``cpu`` (reads no CUDA library)."""
    from checks.finetune.pool import gpu_slots  # here: pool may import this module

    return "cpu" if gpu_slots() == [None] else "cuda"


# --- defaults ----------------------------------------------------------------------------------


def method_defaults(spec: ModelSpec, method: str, device: str, steps: int | None = None) -> Defaults:
    """``method``'s steps and lr on ``spec`` on ``device`` (``cpu`` or ``cuda``); ``steps`` (--steps) wins."""
    shape = shape_of(spec)
    lr = RANDOM_LR.get(shape or "", {}).get(method) if spec.kind == "random" else None
    if steps is not None:
        return Defaults(int(steps), lr)
    if device == "cpu" and shape in CPU_STEPS:
        return Defaults(CPU_STEPS[shape].get(method, CPU_OTHER_STEPS), lr)
    return Defaults(DEFAULT_STEPS, lr)


def plan_defaults(spec: ModelSpec, methods: list[str], device: str, steps: int | None = None) -> dict[str, Defaults]:
    """:func:`method_defaults` of every method, in order."""
    return {m: method_defaults(spec, m, device, steps) for m in methods}


# --- what a run costs --------------------------------------------------------------------------


@dataclass
class Estimate:
    wall_s: float  # the methods' worker start-up and every method, one after another
    peak_bytes: int  # the worker's peak resident memory
    per_method_s: dict[str, float] = field(default_factory=dict)
    cpus: int = 0
    basis: str = ""

    def describe(self) -> str:
        """e.g. ``about 7 min and 7.6 GiB``."""
        minutes = self.wall_s / 60
        when = f"{self.wall_s:.0f} s" if self.wall_s < 90 else f"{minutes:.0f} min" if minutes >= 9.5 \
            else f"{minutes:.1f} min"
        return f"about {when} and {self.peak_bytes / GIB:.1f} GiB"


def cpu_factor(cpus: int, threads: int, load: float = 0.0) -> float:
    """How many times the measured time a CPU run takes on ``cpus`` cores (the worker uses all of them)
    while other processes keep ``load`` runnable (the load average before the run starts)."""
    usable = max(1.0, min(float(cpus), float(MAX_USEFUL_CPUS)))
    factor = (threads / usable) ** PARALLEL if usable >= threads else threads / usable
    return factor * max(1.0, (max(0.0, load) + usable) / usable)


def estimate(spec: ModelSpec, methods: list[str], steps: int | dict[str, int] | None = None,
             device: str = "cpu", cpus: int | None = None, load: float = 0.0) -> Estimate | None:
    """Expected wall time and peak memory of running ``methods`` on ``spec`` on one CPU worker with ``cpus``
    cores (default: this process's), ``steps`` per method (an int for all, a dict per method, or None for
    the defaults). None when nothing was measured for this shape or device (GPUs, unknown shapes)."""
    if device != "cpu":
        return None
    shape = shape_of(spec)
    cost = COSTS.get(shape or "")
    if cost is None:
        return None
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    scale = cpu_factor(cpus, cost.threads, load)
    per: dict[str, float] = {}
    extra = 0
    for m in methods:
        n = steps.get(m) if isinstance(steps, dict) else steps
        n = method_defaults(spec, m, device, n).steps
        c = cost.methods.get(m, cost.other)
        per[m] = round((c.fixed_s + n * c.step_s) * scale, 1)
        extra = max(extra, c.extra_bytes)
    wall = cost.start_s * scale + sum(per.values())
    basis = (f"measured on {cost.threads} idle CPU thread(s) ({cost.measured}), scaled to {cpus} CPU(s)"
             + (f" at load {load:.1f}" if load else ""))
    return Estimate(round(wall, 1), cost.worker_bytes + extra, per, cpus, basis)


def announcement(spec: ModelSpec, methods: list[str], steps: int | None, device: str, cpus: int | None = None,
                 load: float = 0.0) -> str | None:
    """The line to show before a CPU run of a full-size model (None for tiny, GPU runs and unknown shapes), e.g.
    ``random:bloomz-560m on 2 CPU(s): 6 method(s), 6-8 steps per method: about 6.0 min and 7.6 GiB on idle
    cores``. The time is the idle figure; a ``load`` (the load average) of 0.5 or more is named beside it,
    since the 1-minute load average predicts the slowdown poorly (it lags, and counts waiting processes)."""
    if device != "cpu" or shape_of(spec) in (None, TINY):
        return None
    est = estimate(spec, methods, steps, device, cpus)
    if est is None:
        return None
    counts = sorted({method_defaults(spec, m, device, steps).steps for m in methods})
    each = f"{counts[0]} steps each" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} steps per method"
    busy = f"; longer while other work runs (load average {load:.1f})" if load >= 0.5 else ""
    return (f"{spec.label} on {est.cpus} CPU(s): {len(methods)} method(s), {each}: {est.describe()} on idle cores"
            f"{busy}")


__all__ = ["DEFAULT_STEPS", "SEED_LR", "RANDOM_LR", "CPU_STEPS", "COSTS", "Defaults", "Estimate", "shape_of",
           "device_kind", "method_defaults", "plan_defaults", "estimate", "announcement"]
