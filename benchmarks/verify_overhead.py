"""Print what the verify engine itself costs per check: a check that does nothing, run in process,
in a fresh worker process of its own (isolate=True), and in the shared persistent worker
(worker="torch", without importing torch); and how soon a hung check is reported after its timeout.
The whole `verify --quick` run is benchmarks/verify_quick.py.

    .venv/bin/python benchmarks/verify_overhead.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # workers inherit this sys.path: they import benchmarks.standin_checks

from checks.registry import CheckSpec, Context  # noqa: E402
from checks.runner import WorkerClient, run_checks, run_in_process, run_isolated  # noqa: E402


def spec(func: str, name: str | None = None, **how) -> CheckSpec:
    return CheckSpec(f"bench.{name or func}", "bench", func, f"benchmarks.standin_checks:{func}", **how)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def shared_worker_per_check(ctx: Context, n: int = 50) -> tuple[list[float], int]:
    """Seconds per check in a persistent worker that is already up (what every check after the first
    one pays in the shared torch or NVML worker), and how many processes served them."""
    client = WorkerClient("torch")
    try:
        client.call(spec("noop", worker="torch"), ctx, 30)  # start it
        times = timed(lambda: client.call(spec("noop", worker="torch"), ctx, 30), n)
        return times, client.starts
    finally:
        client.close()


def shared_run(ctx: Context, n: int = 20) -> tuple[float, int]:
    """A run_checks of n do-nothing checks in the shared worker: wall time and processes used."""
    specs = [spec("noop", f"noop{i}", worker="torch") for i in range(n)]
    start = time.perf_counter()
    results = run_checks(specs, ctx)
    return time.perf_counter() - start, len({r.measured["pid"].value for r in results})


def main() -> None:
    ctx = Context({}, {})
    inproc = timed(lambda: run_in_process(spec("noop"), ctx), 50)
    isolated = timed(lambda: run_isolated(spec("noop", isolate=True), ctx, 30), 10)
    shared, starts = shared_worker_per_check(ctx)
    run_wall, run_procs = shared_run(ctx)
    late = [t - 1.0 for t in timed(lambda: run_isolated(spec("hangs", isolate=True), ctx, 1.0), 3)]
    print(f"in-process check:             median {statistics.median(inproc) * 1e3:8.3f} ms  (n=50)")
    print(f"own worker process:           median {statistics.median(isolated) * 1e3:8.1f} ms  "
          "(n=10; start, import, stop)")
    print(f"shared worker, once started:  median {statistics.median(shared) * 1e3:8.3f} ms  "
          f"(n=50, {starts} process)")
    print(f"run_checks, 20 checks in the shared worker: {run_wall * 1e3:.0f} ms wall, {run_procs} process")
    print(f"hung check reported:                 {max(late) * 1e3:8.1f} ms after its 1 s timeout (worst of 3)")


if __name__ == "__main__":
    main()
