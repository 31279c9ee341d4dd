"""What fleet-report costs per node, against reading the same files (medians of paired rounds).

A run directory of N nodes is made from one real `peftnode-verify --quick` report (each copy with its own host
name, every tenth node a no-report file), then, side by side in each round:

  fleet        `peftnode-fleet-report DIR --json F --junit F --html F` (load, judge, console, three files)
  yardstick    a Python that starts, imports json and json.loads every report in DIR: the floor of any tool
               that reads the fleet's reports at all

and the ratio fleet / yardstick is taken per round; the medians are printed, for each N.

    .venv/bin/python benchmarks/fleet_report.py [--rounds 3] [--nodes 10,100,1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
YARDSTICK = "import json, pathlib, sys; [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob('*.json')]"


def timed(argv: list[str], ok=(0, 1)) -> float:
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"})
    took = time.monotonic() - started
    if proc.returncode not in ok:
        raise SystemExit(f"{argv[:2]} exited {proc.returncode}: {proc.stderr[-500:]}")
    return took


def make_run(directory: Path, report: dict, nodes: int) -> None:
    hosts = [f"node{i:04d}" for i in range(nodes)]
    for i, host in enumerate(hosts):
        if i % 10 == 9:
            (directory / f"{host}.noreport.json").write_text(json.dumps(
                {"schema": "peftnode.fleet.noreport/1", "host": host, "kind": "unreachable",
                 "reason": "ssh: connect to host port 22: No route to host", "rc": None, "stderr_tail": ""}))
        else:
            named = {**report, "host": {**report["host"], "hostname": host}}
            (directory / f"{host}.json").write_text(json.dumps(named))
    (directory / "run.json").write_text(json.dumps({"schema": "peftnode.fleet.run/1", "run_id": "bench",
                                                    "started_at": "2026-12-02T00:00:00Z", "stack": None,
                                                    "hosts": hosts}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nodes", default="10,100,1000")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "one.json"
        timed([str(BIN / "peftnode-verify"), "--quick", "--no-progress", "--json", str(source)])
        report = json.loads(source.read_text())
        print(f"one real report: {len(report['results'])} results, {source.stat().st_size} bytes")
        for n in (int(x) for x in args.nodes.split(",")):
            run = tmp / f"run{n}"
            run.mkdir()
            make_run(run, report, n)
            fleet = [str(BIN / "peftnode-fleet-report"), str(run), "--json", str(tmp / "f.json"),
                     "--junit", str(tmp / "f.xml"), "--html", str(tmp / "f.html")]
            yard = [sys.executable, "-c", YARDSTICK, str(run)]
            ours, base, ratios = [], [], []
            for r in range(args.rounds):
                first, second = (fleet, yard) if r % 2 == 0 else (yard, fleet)
                a, b = timed(first), timed(second)
                f, y = (a, b) if first is fleet else (b, a)
                ours.append(f)
                base.append(y)
                ratios.append(f / y)
            print(f"{n:5d} nodes: fleet-report {statistics.median(ours):.2f} s, reading the files "
                  f"{statistics.median(base):.2f} s, ratio {statistics.median(ratios):.2f} "
                  f"({statistics.median(ours) / n * 1000:.1f} ms per node)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
