"""Benchmark the smoke fine-tune on the tiny model on CPU, against the peer (one process per method).

The figure (issue 12): the full six-method fine-tune on tiny (``invoke finetune --model tiny``: the
whole CLI process, start-up and reports included) against the plain per-process peer
(benchmarks/peer_one_method.py run once per default method, one Python process each, 30 steps),
measured side by side in pairs (ours, then the peer's six), median ratio of the pairs. Goal <= 0.2.

Also printed: per-method wall time, steps/s and peak memory from the first run's JSON report, and
the same run with every Bloom-capable method (``--methods all``; goal <= 45 s).

    .venv/bin/python benchmarks/finetune_cpu.py [--pairs 3] [--steps 30] [--no-all] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from checks.finetune.methods import SEED_METHODS  # noqa: E402

# ``invoke finetune`` without invoke's own start-up: checks/cli.py's entry, as the console script runs it.
FINETUNE = [sys.executable, "-c", "import sys; from checks.cli import finetune_main; sys.exit(finetune_main())"]
GOAL_RATIO = 0.2


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started, proc


def smoke(methods: str, steps: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.json")
        wall, proc = timed([*FINETUNE, "--model", "tiny", "--methods", methods, "--steps", str(steps),
                            "--json", str(report), "--no-progress"])
        if not report.exists():
            raise SystemExit(f"invoke finetune failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return wall, json.loads(report.read_text()) | {"exit_code_seen": proc.returncode}


def peer(steps: int, show: bool) -> float:
    total = 0.0
    for method in SEED_METHODS:
        wall, proc = timed([sys.executable, "benchmarks/peer_one_method.py", method, "--steps", str(steps)])
        if proc.returncode:
            raise SystemExit(f"peer {method} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        total += wall
        if show:
            line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            print(f"{method:26s} {wall:6.2f} s  {line}")
    return total


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
    parser.add_argument("--pairs", type=int, default=3, help="ours/peer pairs for the median ratio (default 3)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-all", action="store_true", help="skip the --methods all run")
    parser.add_argument("--no-peer", action="store_true", help="skip the one-process-per-method peer")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    pairs: list[tuple[float, float | None]] = []
    for i in range(max(1, args.pairs)):
        six_wall, six = smoke(",".join(SEED_METHODS), args.steps)
        if i == 0:
            print_methods("six default methods (invoke finetune --model tiny)", six_wall, six)
        counts = six["counts"]
        if counts["pass"] != len(SEED_METHODS) + 1:  # the six methods and the workers line
            raise SystemExit(f"the six-method run did not pass: {counts}")
        if args.no_peer:
            pairs.append((six_wall, None))
            continue
        if i == 0:
            print("\n== peer: benchmarks/peer_one_method.py, one Python process per method")
        peer_total = peer(args.steps, show=i == 0)
        pairs.append((six_wall, peer_total))
        print(f"pair {i + 1}: ours {six_wall:.2f} s, peer {peer_total:.2f} s -> {six_wall / peer_total:.3f} x "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)

    all_wall = None
    if not args.no_all:
        all_wall, everything = smoke("all", args.steps)
        print_methods("all methods (invoke finetune --model tiny --methods all)", all_wall, everything)
        print(f"statuses: {everything['counts']}")

    print("\n== summary")
    ours = [o for o, _ in pairs]
    print(f"six default methods incl. start-up: median {statistics.median(ours):.2f} s of "
          f"{', '.join(f'{o:.2f}' for o in ours)}")
    if not args.no_peer:
        ratios = [o / p for o, p in pairs]
        print(f"peer (six processes):               median {statistics.median(p for _, p in pairs):.2f} s of "
              f"{', '.join(f'{p:.2f}' for _, p in pairs)}")
        print(f"full six-method fine-tune on tiny vs the plain per-process peer: "
              f"median {statistics.median(ratios):.3f} x of {len(ratios)} pair(s) "
              f"({', '.join(f'{r:.3f}' for r in ratios)}; goal <= {GOAL_RATIO})")
    if all_wall is not None:
        print(f"all Bloom-capable methods:          {all_wall:.2f} s (goal <= 45 s)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
