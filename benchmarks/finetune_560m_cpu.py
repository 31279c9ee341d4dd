"""Benchmark the six seed methods on random:bloomz-560m on the CPU at their budget defaults, against the estimate.

Runs the methods through the worker pool (checks.finetune.pool.run_methods) with each method's steps and
learning rate from checks/finetune/budget.py, and prints per method: status, steps, lr, wall time, training
time, held-out loss before -> after, the relative drop (before - after) / before, and the memory the method
added; then the total beside budget.estimate() for the same plan (so the estimate is checked against a
real run) and the load average before and after (the machine may be shared: a busy one is slower).

Methods that share (steps, lr) run in one pool call (one worker, one model load); when the plan needs
several calls, the total also says what one worker would have taken (one start-up, every method).

    .venv/bin/python benchmarks/finetune_560m_cpu.py [--steps N] [--methods lora,ia3] [--model random:bloomz-560m]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checks.finetune import budget as B  # noqa: E402
from checks.finetune.methods import SEED_METHODS  # noqa: E402
from checks.finetune.model import parse_model_spec  # noqa: E402
from checks.finetune.pool import run_methods, usable_cpus  # noqa: E402


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:bloomz-560m")
    parser.add_argument("--methods", default=",".join(SEED_METHODS))
    parser.add_argument("--steps", type=int, help="steps for every method (default: budget.py's per method)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-method timeout (s)")
    args = parser.parse_args()
    spec = parse_model_spec(args.model)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    plan = B.plan_defaults(spec, names, "cpu", args.steps)
    cpus = usable_cpus()
    load_before = os.getloadavg()[0]
    idle = B.estimate(spec, names, args.steps, "cpu", cpus)
    busy = B.estimate(spec, names, args.steps, "cpu", cpus, load=load_before)
    print(f"{spec.label} on {cpus} CPU(s); load average before: {load()}")
    print("plan: " + ", ".join(f"{m} {d.steps} steps lr {d.lr if d.lr is not None else B.SEED_LR:g}"
                               for m, d in plan.items()))
    if idle:
        print(f"estimate: {idle.describe()} on idle cores; {busy.describe()} at load {load_before:.2f} "
              f"({idle.basis})")
        print(B.announcement(spec, names, args.steps, "cpu", cpus, load_before))

    groups: dict[tuple[int, float | None], list[str]] = {}
    for m, d in plan.items():
        groups.setdefault((d.steps, d.lr), []).append(m)
    details, verdicts, workers, started = {}, {}, [], time.monotonic()
    for (steps, lr), members in groups.items():
        run = run_methods(members, spec, steps=steps, lr=lr, timeout_s=args.timeout)
        details |= run.details
        verdicts |= {v.subject: v for v in run.verdicts}
        workers += run.workers
        print(f"  ran {', '.join(members)} ({steps} steps, lr {lr if lr is not None else B.SEED_LR:g}): "
              f"{run.wall_s:.1f} s, load now {load()}", flush=True)
    wall = time.monotonic() - started

    print(f"\n{'method':14s} {'status':6s} {'steps':>5s} {'lr':>6s} {'wall s':>7s} {'train s':>7s} "
          f"{'s/step':>6s} {'fixed s':>7s} {'loss before->after':>19s} {'drop':>6s} {'+RSS GiB':>8s} {'est s':>6s}")
    method_s = 0.0
    for m in names:
        d, v = details.get(m) or {}, verdicts.get(m)
        x = d.get("metrics") or {}
        w, t = x.get("wall_s") or 0.0, x.get("train_s") or 0.0
        method_s += w
        before, after = x.get("loss_before"), x.get("loss_after")
        drop = (before - after) / before if before and after is not None else float("nan")
        mem = (x.get("peak_memory_bytes") or 0) / B.GIB
        est = idle.per_method_s.get(m, float("nan")) if idle else float("nan")
        loss = f"{before:.3f}->{after:.3f}" if before is not None and after is not None else "-"
        print(f"{m:14s} {v.status.label if v else '?':6s} {plan[m].steps:5d} "
              f"{plan[m].lr if plan[m].lr is not None else B.SEED_LR:6g} {w:7.1f} {t:7.1f} "
              f"{t / max(plan[m].steps, 1):6.2f} {w - t:7.1f} {loss:>19s} {drop:6.1%} {mem:8.2f} {est:6.1f}")
        if v and v.status.label != "pass":
            print(f"    {v.message}")
    start_s = [round((w.get("import_s") or 0) + (w.get("load_s") or 0), 1) for w in workers]
    one_worker = method_s + (start_s[0] if start_s else 0.0)
    print(f"\nworker start-ups (imports + model): {start_s} s; peak kind "
          f"{next((d.get('metrics', {}).get('peak_memory_kind') for d in details.values()), '?')}")
    print(f"total: {wall:.1f} s in {len(groups)} pool call(s); one worker would take {one_worker:.1f} s "
          f"({one_worker / 60:.1f} min)")
    if idle:
        print(f"estimate: {idle.wall_s:.1f} s idle, {busy.wall_s:.1f} s at load {load_before:.2f}; "
              f"measured/estimate(at that load) = {one_worker / busy.wall_s:.2f}")
    print(f"load average after: {load()}")
    failed = [m for m in names if not verdicts.get(m) or verdicts[m].status.label != "pass"]
    print("all passed" if not failed else f"not passed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
