"""What the operator-facing layer costs, side by side on this machine (medians of paired rounds).

Pairs (each round runs both members back to back, in alternating order, and takes their ratio):
  progress     `peftnode-finetune --model tiny --methods lora --steps N` with its progress events printed
               (one line per event on a non-terminal: worker start, method start, thinned steps, outcome)
               vs the same run with --no-progress. The events travel worker -> pool -> runner -> display.
  invoke       `invoke verify --quick` (the task generated from the CLI's parser, which imports checks.cli
               when invoke loads tasks.py) vs `peftnode-verify --quick`: the same checks through both doors.
  reports      `peftnode-verify --quick` writing the console plus --json, --junit and --prom vs the console
               alone.

    .venv/bin/python benchmarks/report_overhead.py [--rounds 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    took = time.monotonic() - started
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{argv[0]} exited {proc.returncode}: {proc.stderr[-500:]}")
    return took


def pairs(steps: int, tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    finetune = [str(BIN / "peftnode-finetune"), "--model", "tiny", "--methods", "lora", "--steps", str(steps)]
    verify = [str(BIN / "peftnode-verify"), "--quick", "--no-progress"]
    return {
        "progress": (finetune, [*finetune, "--no-progress"]),
        "invoke": ([str(BIN / "invoke"), "-r", str(ROOT), "verify", "--quick", "--no-progress"], verify),
        "reports": ([*verify, "--json", str(tmp / "r.json"), "--junit", str(tmp / "r.xml"),
                     "--prom", str(tmp / "r.prom")], verify),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ours, peer) in pairs(args.steps, Path(tmp)).items():
            ratios, ours_s, peer_s = [], [], []
            for i in range(args.rounds):
                if i % 2:  # alternate which member goes first: neither always gets the warm cache
                    p, o = timed(peer), timed(ours)
                else:
                    o, p = timed(ours), timed(peer)
                ours_s.append(o)
                peer_s.append(p)
                ratios.append(o / p)
            print(f"{name:9s} ours {statistics.median(ours_s):6.2f} s  peer {statistics.median(peer_s):6.2f} s  "
                  f"ratio median {statistics.median(ratios):.3f}  (pairs: "
                  + ", ".join(f"{o:.2f}/{p:.2f}" for o, p in zip(ours_s, peer_s, strict=True)) + ")", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
