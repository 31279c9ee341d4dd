"""`invoke verify --quick` against `python -c "import torch"`, side by side, on this machine.

Each round runs, for every mode below, `python -c "import torch"` and then the verify run (the CLI as a
subprocess with --json), and takes the ratio of the pair; the medians over the rounds are printed
with, per run, the sum of the check durations from the JSON report against the wall time (a sum
above the wall time is checks overlapping) and the check phase (the report's duration_s: the wall
time less the CLI's start-up, stack loading and report writing).

Modes:
  quick          --quick: what `invoke verify --quick` runs here. Without a GPU driver, gpu.driver
                 fails and blocks cuda.torch, perf.* and nccl.allreduce, so torch is never imported.
  torch-worker   --quick --skip gpu.driver,cuda.torch: a dependency that is not in the run does not
                 block, so perf.* and nccl.allreduce run in the shared torch worker (torch imported
                 once; they then find no CUDA).
  torch-serial   the same with --jobs 1: one check at a time, the yardstick for the overlap.

    .venv/bin/python benchmarks/verify_quick.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
VERIFY = [str(PYTHON), "-m", "checks.cli", "--quick", "--no-progress"]
MODES = {
    "quick": [],
    "torch-worker": ["--skip", "gpu.driver,cuda.torch"],
    "torch-serial": ["--skip", "gpu.driver,cuda.torch", "--jobs", "1"],
}
TORCH_CHECKS = ("cuda.torch", "perf.", "nccl.allreduce")


def wall(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return time.perf_counter() - start, done


def check_durations(doc: dict) -> dict[str, float]:
    """Seconds per check: the results of one check (name[subject]) all carry that check's duration."""
    out: dict[str, float] = {}
    for r in doc["results"]:
        base = r["name"].split("[", 1)[0]
        out[base] = max(out.get(base, 0.0), r["duration_s"])
    return out


def verify_once(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        seconds, done = wall([*VERIFY, "--json", str(report), *extra])
        if not report.exists():
            raise SystemExit(f"verify wrote no report (exit {done.returncode}): {done.stderr[-2000:]}")
        doc = json.loads(report.read_text(encoding="utf-8"))
    durations = check_durations(doc)
    ran = [r for r in doc["results"] if r["name"].startswith(TORCH_CHECKS) and r["status"] != "skip"]
    return {"wall": seconds, "phase": doc["duration_s"], "sum": sum(durations.values()), "exit": done.returncode,
            "counts": doc["counts"],
            "blocked_by": doc.get("blocked_by", {}), "slowest": max(durations.items(), key=lambda kv: kv[1]),
            "torch_ran": sorted(r["name"] for r in ran)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, dict]]] = {mode: [] for mode in MODES}
    for i in range(args.rounds):
        for mode, extra in MODES.items():
            torch_s, done = wall([str(PYTHON), "-c", "import torch"])
            if done.returncode != 0:
                raise SystemExit(f"import torch failed: {done.stderr[-2000:]}")
            run = verify_once(extra)
            rows[mode].append((torch_s, run))
            slow_name, slow_s = run["slowest"]
            print(f"round {i + 1} {mode:13s} verify {run['wall']:6.2f} s, import torch {torch_s:5.2f} s, "
                  f"ratio {run['wall'] / torch_s:4.2f}; checks sum {run['sum']:6.2f} s "
                  f"({run['sum'] / run['wall']:.1f}x the wall time), check phase {run['phase']:5.2f} s; "
                  f"slowest {slow_name} {slow_s:.2f} s; "
                  f"exit {run['exit']}", flush=True)
    print()
    print(f"medians of {args.rounds} pairs (verify wall / `import torch` wall):")
    for mode, pairs in rows.items():
        verify = statistics.median(run["wall"] for _, run in pairs)
        torch_s = statistics.median(t for t, _ in pairs)
        ratio = statistics.median(run["wall"] / t for t, run in pairs)
        summed = statistics.median(run["sum"] for _, run in pairs)
        phase = statistics.median(run["phase"] for _, run in pairs)
        last = pairs[-1][1]
        counts = ", ".join(f"{n} {label}" for label, n in last["counts"].items())
        print(f"  {mode:13s} verify {verify:6.2f} s vs import torch {torch_s:5.2f} s -> {ratio:4.2f}x; "
              f"sum of check durations {summed:6.2f} s vs wall {verify:6.2f} s (check phase {phase:5.2f} s)")
        print(f"  {'':13s} {counts}; blocked_by {last['blocked_by'] or '{}'}; "
              f"torch checks that ran: {', '.join(last['torch_ran']) or 'none'}")


if __name__ == "__main__":
    main()
