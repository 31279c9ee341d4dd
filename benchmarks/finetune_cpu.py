"""Benchmark the smoke fine-tune on the tiny model on CPU, against the peer (one process per method).

Prints per-method wall time, steps/s and peak memory from ``invoke finetune``'s JSON report, the
total for the six default methods including start-up (the whole CLI process), the same for every
Bloom-capable method (``--methods all``), and the total of benchmarks/peer_one_method.py run once
per default method (one Python process each, 30 steps).

    .venv/bin/python benchmarks/finetune_cpu.py [--steps 30] [--no-all] [--no-peer]

Goals: six default methods <= 12 s including start-up (<= 0.4x the peer), all methods <= 45 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checks.finetune.methods import SEED_METHODS  # noqa: E402


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started, proc


def smoke(methods: str, steps: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.json")
        wall, proc = timed([sys.executable, "-m", "checks.finetune.cli", "--model", "tiny", "--methods", methods,
                            "--steps", str(steps), "--json", str(report), "--no-progress"])
        if not report.exists():
            raise SystemExit(f"invoke finetune failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return wall, json.loads(report.read_text()) | {"exit_code_seen": proc.returncode}


def print_methods(title: str, wall: float, data: dict) -> None:
    print(f"\n== {title}: {wall:.2f} s for the whole process (exit {data['exit_code_seen']})")
    print(f"{'method':26s} {'status':6s} {'wall s':>7s} {'steps/s':>8s} {'tokens/s':>9s} {'peak MiB':>9s}")
    for r in data["results"]:
        m = {k: v["value"] for k, v in r["measured"].items()}
        name = r["name"].split("[", 1)[-1].rstrip("]")
        if name == "workers":
            print(f"{'(workers)':26s} {'':6s} import {m.get('import_s', 0):.2f} s, model {m.get('load_s', 0):.2f} s, "
                  f"pool {m.get('wall_s', 0):.2f} s")
            continue
        print(f"{name:26s} {r['status']:6s} {m.get('wall_s', 0):7.2f} {m.get('steps_per_s', 0):8.1f} "
              f"{m.get('tokens_per_s', 0):9.0f} {m.get('peak_memory', 0):9.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-all", action="store_true", help="skip the --methods all run")
    parser.add_argument("--no-peer", action="store_true", help="skip the one-process-per-method peer")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    six_wall, six = smoke(",".join(SEED_METHODS), args.steps)
    print_methods("six default methods (invoke finetune --model tiny)", six_wall, six)
    all_wall = None
    if not args.no_all:
        all_wall, everything = smoke("all", args.steps)
        print_methods("all methods (invoke finetune --model tiny --methods all)", all_wall, everything)
        counts = {}
        for r in everything["results"]:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        print(f"statuses: {counts}")
    peer_total = None
    if not args.no_peer:
        print("\n== peer: benchmarks/peer_one_method.py, one Python process per method")
        peer_total = 0.0
        for method in SEED_METHODS:
            wall, proc = timed([sys.executable, "benchmarks/peer_one_method.py", method, "--steps", str(args.steps)])
            peer_total += wall
            line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
            print(f"{method:26s} {wall:6.2f} s  {line}")
        print(f"peer total: {peer_total:.2f} s")

    print("\n== summary")
    print(f"six default methods incl. start-up: {six_wall:.2f} s (goal <= 12 s)")
    if peer_total:
        print(f"peer (six processes):               {peer_total:.2f} s -> ratio {six_wall / peer_total:.2f} "
              f"(goal <= 0.4)")
    if all_wall is not None:
        print(f"all Bloom-capable methods:          {all_wall:.2f} s (goal <= 45 s)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
