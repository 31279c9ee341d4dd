"""Print what the verify engine itself costs: per-check overhead in process and in a worker process,
how soon a hung check is reported after its timeout, and a whole `--quick` run on this machine.

    .venv/bin/python benchmarks/verify_overhead.py
"""

from __future__ import annotations

import contextlib
import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checks.registry import CheckSpec, Context  # noqa: E402
from checks.runner import run_in_process, run_isolated  # noqa: E402


def spec(func: str, isolate: bool) -> CheckSpec:
    return CheckSpec(f"bench.{func}", "bench", func, f"tests.helpers.fake_checks:{func}", isolate)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ctx = Context({}, {}, options={"sleep_s": 30})
    with contextlib.redirect_stdout(io.StringIO()):  # the fake check prints on purpose
        inproc = timed(lambda: run_in_process(spec("passes", False), ctx), 50)
    worker = timed(lambda: run_isolated(spec("passes", True), ctx, 30), 10)
    late = [t - 1.0 for t in timed(lambda: run_isolated(spec("sleeps", True), ctx, 1.0), 3)]
    print(f"in-process check:      median {statistics.median(inproc) * 1e3:8.3f} ms  (n=50)")
    print(f"worker-process check:  median {statistics.median(worker) * 1e3:8.1f} ms  (n=10)")
    print(f"hung check reported:   {max(late) * 1e3:8.1f} ms after its 1 s timeout (worst of 3)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "checks.cli", "--quick", "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()
    print(f"verify --quick (this machine): {wall:.1f} s wall, exit {proc.returncode}: {summary}")


if __name__ == "__main__":
    main()
