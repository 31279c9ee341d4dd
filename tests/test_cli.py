"""The CLI and the invoke tasks, end to end in real processes: every exit code, every bad input."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from checks.cli import main

ROOT = Path(__file__).resolve().parent.parent
INVOKE = str(Path(sys.executable).parent / "invoke")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "checks.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def assert_usage_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("peftnode verify: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def test_healthy_run_exits_0(capsys):
    assert main(["--only", "system.os,system.disk", "--gpus", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "HEALTHY (exit 0)" in out and "system.os" not in out  # passes are counted per group, not named
    assert main(["--only", "system.os,system.disk", "--gpus", "0", "--no-progress", "--verbose"]) == 0
    assert "system.os" in capsys.readouterr().out


def test_unhealthy_run_exits_1(capsys):
    # This machine runs Python 3.11; the seed stack pins 3.10.
    assert main(["--stack", "cu117", "--only", "python.version", "--no-progress"]) == 1
    assert "UNHEALTHY" in capsys.readouterr().out


@pytest.mark.parametrize("args, needles", [
    (["--only", "bogus"], ["--only: unknown check or group 'bogus'",
                           "groups: cuda, finetune, gpu, jupyter, nccl, perf, python, system"]),
    (["--skip", "system,nope"], ["--skip: unknown check or group 'nope'"]),
    (["--only", "system", "--skip", "system"], ["leave no check to run"]),
    (["--stack", "/nonexistent/stack.yml"], ["/nonexistent/stack.yml: no such file"]),
    (["--stack", "cu999"], ["no stack named 'cu999'", "cu117"]),
    (["--timeout", "abc"], ["--timeout: 'abc' is not a positive number of seconds"]),
    (["--timeout", "-1"], ["--timeout: '-1'"]),
    (["--timeout", "0"], ["--timeout: '0'"]),
    (["--timeout", "nan"], ["--timeout: 'nan'"]),
    (["--gpus", "eight"], ["--gpus: 'eight' is not a whole number from 0 to 64"]),
    (["--json", "/nonexistent-dir/r.json"], ["--json: cannot write /nonexistent-dir/r.json: directory"]),
    (["--junit", "/tmp"], ["--junit: /tmp is a directory"]),
    (["--stack", "cu117", "--manifest", "/etc/x.yml"], ["give one of them"]),
    (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    (["--jobs", "0"], ["--jobs: '0' is not a whole number from 1 to 64"]),
    (["--jobs", "many"], ["--jobs: 'many'"]),
])
def test_bad_usage_exits_2_with_one_line(args, needles):
    assert_usage_error(run_cli(*args), *needles)


def test_malformed_stack_exits_2_naming_file_key_reason(tmp_path):
    data = yaml.safe_load((ROOT / "stacks" / "cu117.yml").read_text())
    data["nccl"]["version"] = "two"
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(data))
    assert_usage_error(run_cli("--stack", str(bad)), f"{bad}: nccl.version: 'two' is not an NCCL version")


def test_unwritable_report_path_is_refused_before_running(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores mode bits; a read-only file system path stands in
            target = "/proc/peftnode-report.prom"
        else:
            target = str(locked / "r.prom")
        proc = run_cli("--prom", target)
        assert proc.returncode == 2 and "--prom: cannot write" in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stdout == ""  # nothing ran
    finally:
        locked.chmod(0o700)


def test_list_shows_every_check():
    proc = run_cli("--list")
    assert proc.returncode == 0
    for name in ("system.os", "python.packages", "gpu.driver", "jupyter.server"):
        assert name in proc.stdout


def test_quick_run_writes_three_valid_reports_via_invoke(tmp_path):
    """The issue's 'done when': invoke verify --quick --json --junit --prom on a machine with no GPU."""
    from jsonschema import validate
    from prometheus_client.parser import text_string_to_metric_families

    from checks.report.jsonreport import load_schema

    j, x, p = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.prom"
    proc = subprocess.run([INVOKE, "verify", "--quick", "--json", str(j), "--junit", str(x), "--prom", str(p)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == 1, proc.stdout  # no driver, Python 3.11 vs the seed's 3.10: unhealthy
    doc = json.loads(j.read_text())
    validate(doc, load_schema())
    assert doc["exit_code"] == 1 and doc["stack"]["name"] == "cu117"
    names = {r["name"].split("[")[0] for r in doc["results"]}
    assert {"system.os", "python.version", "python.openssl", "python.packages", "system.disk", "gpu.driver",
            "jupyter.server"} <= names
    for r in doc["results"]:
        assert r["status"] in {"pass", "warn", "fail", "skip", "error"} and r["message"].strip()
    driver = next(r for r in doc["results"] if r["name"] == "gpu.driver")
    if not Path("/proc/driver/nvidia/version").exists():
        assert driver["status"] == "fail" and driver["message"].startswith("NVIDIA driver not loaded")
    cases = ET.parse(x).getroot().iter("testcase")
    assert len(list(cases)) == len(doc["results"])
    families = {f.name: f for f in text_string_to_metric_families(p.read_text())}
    assert [s.value for s in families["peftnode_node_healthy"].samples] == [0.0]


def test_invoke_passes_exit_2_through():
    proc = subprocess.run([INVOKE, "verify", "--only", "bogus"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_usage_error(proc, "--only: unknown check or group 'bogus'")
    proc = subprocess.run([INVOKE, "verify", "--jobs", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_usage_error(proc, "--jobs: '0' is not a whole number from 1 to 64")


def test_invoke_menu_lists_tasks_with_help():
    proc = subprocess.run([INVOKE, "--list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for name in ("verify", "lint", "test"):
        assert f"\n  {name} " in proc.stdout
    helps = subprocess.run([INVOKE, "--help", "verify"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    for flag in ("--stack", "--only", "--skip", "--quick", "--json", "--junit", "--prom", "--timeout"):
        assert flag in helps


def test_step_summary_is_appended_when_github_sets_it(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    proc = run_cli("--only", "system.os", "--gpus", "0", env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert proc.returncode == 0
    text = summary.read_text()
    assert text.startswith("# earlier step\n") and "system.os" in text and "HEALTHY" in text


def test_progress_lines_on_stderr_off_terminal():
    proc = run_cli("--only", "system.os,python.openssl", "--gpus", "0")
    lines = proc.stderr.splitlines()  # one line per check as it finishes (checks run at once: any order)
    assert [line[:6] for line in lines] == ["[1/2] ", "[2/2] "], lines
    assert sorted(line.split()[1] for line in lines) == ["python.openssl:", "system.os:"]
    assert any(line.startswith("[") and "system.os: pass" in line for line in lines)
    assert "[1/2]" not in run_cli("--only", "system.os", "--no-progress").stderr


@pytest.mark.parametrize("value, needle", [
    ("colour=red", "--expect: 'colour=red' is not KEY=VALUE with KEY one of gpus"),
    ("gpus=lots", "--expect: gpus: expected an integer"),
    ("cuda_home=relative", "--expect: cuda_home: 'relative' is not an absolute path"),
    ("novalue", "is not KEY=VALUE"),
])
def test_bad_expect_exits_2(value, needle):
    assert_usage_error(run_cli("--expect", value), needle)


def test_expect_overrides_node_expectations(tmp_path):
    proc = run_cli("--only", "system.disk", "--expect", f"data_path={tmp_path}",
                   "--expect", "min_free_gib={data: 1000000000}", "--json", str(tmp_path / "r.json"))
    doc = json.loads((tmp_path / "r.json").read_text())
    data = next(r for r in doc["results"] if r["name"] == "system.disk[data]")
    assert proc.returncode == 1 and data["status"] == "fail" and str(tmp_path) in data["message"]


@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists(), reason="this machine has an NVIDIA driver loaded")
def test_a_missing_driver_is_one_root_cause_not_a_failure_per_check(tmp_path):
    """No driver here: gpu.driver fails once; the NVML checks, cuda.torch, perf.* and nccl.allreduce that
    need it are skipped as blocked by it, with its reason, instead of failing one by one."""
    proc = run_cli("--stack", "cu117", "--only", "gpu,cuda.torch,perf,nccl", "--quick", "--no-progress",
                   "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 1
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    failed = [r["name"] for r in results if r["status"] in ("fail", "error")]
    assert failed == ["gpu.driver"], failed
    blocked = [r for r in results if r["message"].startswith("blocked by gpu.driver")]
    assert {r["name"] for r in blocked} >= {"gpu.inventory", "gpu.ecc", "cuda.torch", "perf.gemm", "nccl.allreduce"}
    driver = next(r for r in results if r["name"] == "gpu.driver")
    assert all(driver["message"][:40] in r["message"] for r in blocked)


def test_finetune_refuses_to_overwrite_verifys_metrics_file(tmp_path, capsys):
    """Both commands' files belong in one textfile directory, each its own: finetune given verify's file stops
    at exit 2 before running anything, and the file is left as verify wrote it."""
    from checks.cli import finetune_main

    prom = tmp_path / "peftnode.prom"
    assert main(["--only", "system.os", "--gpus", "0", "--no-progress", "--prom", str(prom)]) == 0
    before = prom.read_text()
    assert finetune_main(["--model", "tiny", "--no-progress", "--prom", str(prom)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftnode finetune: error: --prom ") and "verify`" in err[0]
    assert prom.read_text() == before
