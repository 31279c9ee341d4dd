"""A fake 8-GPU node through the real runner: the shared workers vs a worker per check.

Five torch stand-ins (worker="torch", exclusive, as perf.gemm/memory/pcie, cuda.torch and
nccl.allreduce are) each "initialise CUDA" once per process (2 s) and then work a few ms per GPU; five
real gpu.* NVML checks run on the fake NVML of an 8-GPU node whose first nvmlInit in a process takes
0.5 s (benchmarks/standin_checks.py). Both sets go through checks.runner.run_checks, once with
``fresh_workers=False`` (one torch worker and one NVML worker for the run) and once with
``fresh_workers=True`` (a fresh worker process per check: what verify did before), side by side in
each of N rounds; the medians and their ratio are printed.

    .venv/bin/python benchmarks/fake_gpus.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # workers inherit this sys.path: they import benchmarks.standin_checks

from benchmarks import standin_checks as standin  # noqa: E402
from checks.registry import CheckSpec, Context  # noqa: E402
from checks.result import Status  # noqa: E402
from checks.runner import run_checks  # noqa: E402


def torch_specs() -> list[CheckSpec]:
    return [CheckSpec(f"fake.{name}", "fake", name, f"benchmarks.standin_checks:{name}", worker="torch",
                      exclusive=True, timeout_s=60) for name in standin.TORCH_CHECKS]


def nvml_specs() -> list[CheckSpec]:
    return [CheckSpec(f"fake.{name}", "fake", name, f"benchmarks.standin_checks:{name}", worker="nvml",
                      timeout_s=60) for name in standin.NVML_CHECKS]


def one_run(specs: list[CheckSpec], fresh: bool) -> tuple[float, int, int]:
    """Wall time, worker processes that served the torch stand-ins (they report their pid), and
    results that did not pass."""
    ctx = Context(stack={}, node={"gpus": standin.GPUS})
    start = time.perf_counter()
    results = run_checks(specs, ctx, fresh_workers=fresh)
    wall = time.perf_counter() - start
    pids = {r.measured["pid"].value for r in results if "pid" in r.measured}
    bad = [r for r in results if r.status not in (Status.PASS, Status.WARN)]
    for r in bad:
        print(f"    ! {r.name}: {r.status.label}: {r.message}", file=sys.stderr)
    return wall, len(pids), len(bad)


def compare(label: str, specs: list[CheckSpec], rounds: int) -> None:
    shared, fresh, ratios = [], [], []
    has_torch = any(s.worker == "torch" for s in specs)

    def procs(n: int) -> str:
        return f"{n} torch process(es), " if has_torch else ""

    for i in range(rounds):
        s_wall, s_procs, s_bad = one_run(specs, fresh=False)
        f_wall, f_procs, f_bad = one_run(specs, fresh=True)
        shared.append(s_wall)
        fresh.append(f_wall)
        ratios.append(s_wall / f_wall)
        print(f"  round {i + 1}: shared {s_wall:6.2f} s ({procs(s_procs)}{s_bad} not pass)   "
              f"per-check {f_wall:6.2f} s ({procs(f_procs)}{f_bad} not pass)   ratio {s_wall / f_wall:.2f}")
    print(f"{label}: shared workers median {statistics.median(shared):.2f} s, per-check workers median "
          f"{statistics.median(fresh):.2f} s -> shared/per-check {statistics.median(ratios):.2f} "
          f"(median of {rounds} pairs; {statistics.median(fresh) / statistics.median(shared):.1f}x faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"fake node: {standin.GPUS} GPUs, CUDA init {standin.CUDA_INIT_S:g} s per process, "
          f"{standin.PER_GPU_S * 1e3:g} ms work per GPU per check, first nvmlInit {standin.NVML_INIT_S:g} s "
          "per process")
    compare(f"{len(standin.TORCH_CHECKS)} torch checks (exclusive)", torch_specs(), args.rounds)
    compare(f"{len(standin.NVML_CHECKS)} NVML checks", nvml_specs(), args.rounds)
    compare(f"{len(standin.TORCH_CHECKS)} torch + {len(standin.NVML_CHECKS)} NVML checks",
            torch_specs() + nvml_specs(), args.rounds)


if __name__ == "__main__":
    main()
