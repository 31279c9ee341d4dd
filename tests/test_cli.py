"""The CLI and the invoke tasks, end to end in real processes: every exit code, every bad input."""

import json
import os
import subprocess
import sys
import time
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


# --- hostile stack files and flags: exit 2, one short line, nothing run ----------------------------------------

STACK_DATA = ROOT / "tests" / "data" / "stacks"
VERIFY = str(Path(sys.executable).parent / "peftnode-verify")


@pytest.fixture
def nothing_runs(monkeypatch, tmp_path):
    """Fail the test if the CLI gets as far as running a check; give the path of a JSON report that must
    not be written either."""
    import checks.cli as cli

    def refuse(*args, **kwargs):
        pytest.fail("a check ran although the command line was bad")

    monkeypatch.setattr(cli, "run_checks", refuse)
    report = tmp_path / "report.json"
    yield report
    assert not report.exists(), "a report was written although the command line was bad"


def usage_error(capsys, argv, *needles, entry=main, prog="peftnode verify") -> str:
    """Run ``entry(argv)`` in this process: exit 2, one short line on stderr holding every needle."""
    assert entry(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1, captured.err
    line = captured.err.rstrip("\n")
    assert line.startswith(f"{prog}: error: ") and len(line) <= 400, line
    for needle in needles:
        assert needle in line, line
    return line


@pytest.mark.parametrize("name, needle", [
    ("alias-bomb-name.yml", ":12:5: YAML aliases here expand to more than 100000 values"),
    ("alias-recursive.yml", ":5:17: a YAML alias inside the value it names"),
    ("binary.yml", ": not UTF-8 text (byte 0x8b at offset 1)"),
    ("latin1.yml", ": not UTF-8 text (byte 0xe9 at offset 5)"),
    ("empty.yml", ": empty (no YAML document)"),
    ("comments-only.yml", ": empty (no YAML document)"),
])
@pytest.mark.parametrize("flag", ["--stack", "--manifest"])
def test_a_hostile_stack_or_manifest_exits_2_before_anything_runs(name, needle, flag, capsys, nothing_runs):
    path = STACK_DATA / name
    usage_error(capsys, [flag, str(path), "--json", str(nothing_runs), "--no-progress"], f"{path}{needle}")


def test_the_alias_bomb_answers_at_once_from_the_console_script(tmp_path):
    """The issue's hang: peftnode-verify given a stack whose name is an alias bomb never answered. It must
    answer within a couple of seconds (the limit here leaves room for a loaded CI machine), without writing
    a report."""
    report = tmp_path / "r.json"
    started = time.monotonic()
    proc = subprocess.run([VERIFY, "--stack", str(STACK_DATA / "alias-bomb-name.yml"), "--json", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert_usage_error(proc, "YAML aliases here expand to more than 100000 values")
    assert proc.stdout == "" and not report.exists()
    assert elapsed < 15, elapsed


@pytest.mark.parametrize("build, needle", [
    (lambda p: p.mkdir(), ": is a directory, not a stack file"),
    (lambda p: p.write_bytes(b"#" * (1024 * 1024 + 1)), ": larger than 1 MiB"),
    (lambda p: os.mkfifo(p), ": not a regular file"),
])
def test_a_directory_a_huge_file_or_a_fifo_exits_2(tmp_path, build, needle, capsys, nothing_runs):
    path = tmp_path / "stack.yml"
    build(path)
    usage_error(capsys, ["--stack", str(path), "--json", str(nothing_runs)], f"{path}{needle}")


@pytest.mark.parametrize("argv, needle", [
    (["--only", ""], "--only: '' names no check or group"),
    (["--only", ","], "--only: ',' names no check or group"),
    (["--only", " , ,"], "--only: ' , ,' names no check or group"),
    (["--only", "system", "--only", ""], "--only: '' names no check or group"),
    (["--only", "system,"], "--only: 'system,' has an empty name (a stray comma?)"),
    (["--only", "system,,gpu"], "--only: 'system,,gpu' has an empty name"),
    (["--skip", ""], "--skip: '' names no check or group"),
    (["--skip", ","], "--skip: ',' names no check or group"),
    (["--only", "sys\ntem"], "--only: 'sys\\ntem' is not a check or group name"),
    (["--only", "x" * 100_000], "--only: 'xxxxxxxx"),
    (["--stack", ""], "--stack: empty"),
    (["--manifest", ""], "--manifest: empty"),
    (["--stack", "cu\x1b[2J117"], "'cu\\x1b[2J117' is not a stack name"),
    (["--gpus", "\u00b2"], "--gpus: '\u00b2' is not a whole number from 0 to 64"),  # isdigit() says yes, int() no
    (["--gpus", "0" * 5000], "--gpus: '000000"),  # past Python's int digit limit
    (["--jobs", "\u0663"], "--jobs: '\u0663' is not a whole number"),  # an Arabic-Indic 3
    (["--timeout", "9" * 100_000], "--timeout: '999999"),
    (["--json", ""], "--json: empty; give a file path"),
    (["--junit", "/tmp/" + "x" * 5000], "--junit: cannot write '/tmp/xxxxx"),
])
def test_hostile_flags_exit_2_on_one_short_line(argv, needle, capsys, nothing_runs):
    usage_error(capsys, [*argv, "--json", str(nothing_runs)] if "--json" not in argv else argv, needle)


def test_a_model_is_checked_before_anything_runs(tmp_path, capsys, nothing_runs):
    no_config = tmp_path / "empty-model"
    no_config.mkdir()
    report = ["--json", str(nothing_runs), "--no-progress"]
    usage_error(capsys, ["--model", str(tmp_path / "nowhere"), *report],
                f"--model: model directory {tmp_path / 'nowhere'} does not exist (give tiny, random:bloomz-560m")
    usage_error(capsys, ["--model", str(no_config), *report],
                f"--model: model directory {no_config} has no config.json")
    usage_error(capsys, ["--model", "random:nosuch", *report], "--model: unknown random model 'random:nosuch'")
    usage_error(capsys, ["--model", "", *report], "--model: empty")
    usage_error(capsys, ["--model", "m\x1b[31m", *report], "--model: 'm\\x1b[31m' is not tiny")
    usage_error(capsys, ["--model", "random:" + "x" * 100_000, *report], "--model: 'random:xxxx")
    usage_error(capsys, ["--model", "/" + "x" * 300, *report], "--model: cannot use '/xxxx", "File name too long")


def test_the_stacks_own_model_path_and_tiny_are_accepted_at_start(tmp_path):
    """The stack's model.path being absent is the node's state (the fine-tune fails naming it and how to fetch
    it), not a bad flag: given explicitly it is accepted, like tiny."""
    stack_path = yaml.safe_load((ROOT / "stacks" / "cu117.yml").read_text())["model"]["path"]
    for model in (stack_path, "tiny"):
        assert main(["--model", model, "--only", "system.os", "--gpus", "0", "--no-progress",
                     "--json", str(tmp_path / "r.json")]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["options"]["model"] == model


BOMB_VALUE = "{x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
    f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)) + "}"


@pytest.mark.parametrize("value, needles", [
    (f"perf={BOMB_VALUE}", ["--expect: perf: cannot read '{x0: &a0", "YAML aliases here expand to more than 100000"]),
    (f"gpu_model={BOMB_VALUE}", ["--expect: gpu_model: cannot read", "expand to more than 100000"]),
    ("data_path=/" + "d" * 100_000, ["--expect: data_path: '/ddd", "is 100001 characters long (at most 4096)"]),
    ("gpu_model=\x1b]0;owned\x07", ["--expect: gpu_model: cannot read '\\x1b]0;owned\\x07'",
                                    "unacceptable character #x001b"]),
    ("gpus=\x00", ["--expect: gpus: cannot read '\\x00'", "unacceptable character #x0000"]),
    ("gpus=" + "9" * 5000, ["--expect: gpus: cannot read '99999", "Exceeds the limit (4300 digits)"]),
    ("gpus=\u202e8", ["--expect: gpus: expected an integer, got str '\\u202e8'"]),
    ("min_free_gib={data: .nan}", ["--expect: min_free_gib.data: nan is not a finite number"]),
    ("perf={gemm_tflops: -.inf}", ["--expect: perf.gemm_tflops: -inf is not a finite number"]),
    ("gpus=[" + "[" * 20_000, ["--expect: gpus: cannot read '[[[[", "nested too deeply"]),
    ("x" * 100_000 + "=1", ["--expect: 'xxxxx", "is not KEY=VALUE"]),
    ("min_free_gib={" + ", ".join(f"k{i}: 1" for i in range(5000)) + "}",
     ["--expect: min_free_gib.k0: unknown key", "min_free_gib.k2: unknown key", "; ... and 4997 more problem(s)"]),
])
def test_hostile_expect_values_exit_2_on_one_short_line(value, needles, capsys, nothing_runs):
    usage_error(capsys, ["--expect", value, "--json", str(nothing_runs)], *needles)


@pytest.mark.parametrize("argv, needle", [
    (["--methods", ""], "--methods: '' names no method"),
    (["--methods", ","], "--methods: ',' names no method"),
    (["--methods", "lora,"], "--methods: 'lora,' has an empty name"),
    (["--methods", "lo ra"], "--methods: 'lo ra' is not a method name"),
    (["--methods", "x" * 100_000], "--methods: 'xxxx"),
    (["--model", "random:nosuch"], "--model: unknown random model 'random:nosuch'"),
    (["--model", "random:" + "x" * 100_000], "--model: 'random:xxxx"),
    (["--model", "random:" + "x" * 1000], "--model: unknown random model 'random:xxxx"),
    (["--model", "/" + "x" * 300], "--model: cannot use '/xxxx"),
    (["--model", "tiny\n"], "--model: 'tiny\\n' is not tiny"),
])
def test_hostile_finetune_flags_exit_2_on_one_short_line(argv, needle, capsys, nothing_runs):
    from checks.cli import finetune_main

    usage_error(capsys, [*argv, "--json", str(nothing_runs)], needle, entry=finetune_main, prog="peftnode finetune")


@pytest.mark.parametrize("flag", ["--junit", "--prom"])
def test_only_json_may_go_to_standard_output(flag, tmp_path, monkeypatch, capsys):
    """`--junit -` / `--prom -` would have written a file named '-' in the working directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["--only", "system.os", "--no-progress", flag, "-"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag}: '-' (standard output) is for --json only" in err[0]
    assert not (tmp_path / "-").exists()
