"""Ctrl-C during a run, with a real SIGINT to a real process: the run stops, every child it started is gone,
what finished is kept, the rest is ``skip: interrupted``, the reports are written and the exit code is 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET

import jsonschema
import psutil
import pytest

from checks import proc
from checks.report.jsonreport import load_schema
from checks.result import Status, Verdict
from tests.conftest import ROOT
from tests.helpers.procs import default_sigint, gone


def runs_a_command(ctx):
    """An in-process check waiting on a command of its own (started through checks.proc, like dcgmi)."""
    ex = proc.run(["sleep", "60"], timeout_s=60)
    return Verdict(Status.PASS, f"sleep ended: {ex.describe()}")


def carrying(tokens: set[str]) -> list[int]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(proc.TOKEN_ENV) in tokens and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


def tree(pid: int) -> tuple[list[int], set[str]]:
    """The pids below ``pid`` and the checks.proc tokens they carry."""
    pids, tokens = [], set()
    for p in psutil.Process(pid).children(recursive=True):
        pids.append(p.pid)
        try:
            token = p.environ().get(proc.TOKEN_ENV)
        except (psutil.Error, OSError):
            token = None
        if token:
            tokens.add(token)
    return pids, tokens


def test_ctrl_c_keeps_what_finished_and_kills_every_kind_of_child(tmp_path):
    """Runner level, stand-in checks: one finished, four running (shared worker with a grandchild, isolated
    worker, an in-process command, a check waiting for the GPUs) and one waiting for a dependency."""
    pidfile = tmp_path / "pid"
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from checks.registry import CheckSpec, Context
        from checks.runner import RunInterrupted, run_checks
        F = "tests.helpers.fake_checks:"
        specs = [
            CheckSpec("test.quick", "test", "t", F + "passes"),
            CheckSpec("test.shared", "test", "t", F + "spawns_sleeper", worker="torch", exclusive=True),
            CheckSpec("test.isolated", "test", "t", F + "sleeps", isolate=True),
            CheckSpec("test.command", "test", "t", "tests.test_interrupt:runs_a_command"),
            CheckSpec("test.queued", "test", "t", F + "sleeps", exclusive=True),
            CheckSpec("test.dependant", "test", "t", F + "passes", needs=("test.isolated",)),
        ]
        ctx = Context({{}}, {{}}, options={{"pidfile": {str(pidfile)!r}, "sleep_s": 60}})
        try:
            run_checks(specs, ctx, jobs=6)
        except RunInterrupted as stop:
            print(json.dumps([[r.name, r.status.label, r.message] for r in stop.results]), flush=True)
            sys.exit(130)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             start_new_session=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 60
    while True:  # every running kind has started: the grandchild's pid, 3 workers and the command's sleep
        assert time.monotonic() < deadline and child.poll() is None, "the checks never all started"
        if pidfile.exists() and pidfile.read_text() and len(psutil.Process(child.pid).children()) >= 3:
            pids, tokens = tree(child.pid)
            if len(tokens) >= 3 and int(pidfile.read_text()) in pids:
                break
        time.sleep(0.1)
    time.sleep(0.5)  # test.quick has long finished
    pids, tokens = tree(child.pid)
    signalled = time.monotonic()
    os.kill(child.pid, signal.SIGINT)
    out, _ = child.communicate(timeout=30)
    took = time.monotonic() - signalled
    assert child.returncode == 130, out
    assert took < 10, f"{took:.1f} s from Ctrl-C to exit"
    results = {name: (status, message) for name, status, message in json.loads(out.splitlines()[-1])}
    assert results.pop("test.quick[a]") == ("pass", "ok a") and results.pop("test.quick[b]") == ("warn", "meh b")
    assert results == {name: ("skip", "interrupted") for name in
                       ("test.shared", "test.isolated", "test.command", "test.queued", "test.dependant")}
    assert all(gone(pid) for pid in pids), [p for p in pids if psutil.pid_exists(p)]
    assert not carrying(tokens)


@pytest.mark.slow
def test_ctrl_c_during_the_fine_tune_keeps_the_finished_methods_and_writes_every_report(tmp_path):
    pytest.importorskip("peft")
    report, prom, junit = tmp_path / "r.json", tmp_path / "f.prom", tmp_path / "j.xml"
    argv = [sys.executable, "-c", "from checks.cli import finetune_console_main; finetune_console_main()",
            "--model", "tiny", "--methods", "lora,ia3,prompt_tuning", "--steps", "200", "--workers", "1",
            "--json", str(report), "--prom", str(prom), "--junit", str(junit)]
    child = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=default_sigint)
    seen = []
    deadline = time.monotonic() + 50
    for line in child.stderr:  # the progress stream: wait for the first method's outcome
        seen.append(line)
        if "[1/3] lora: " in line:
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        pytest.fail("the run ended before a method finished:\n" + "".join(seen))
    pids, tokens = tree(child.pid)
    assert pids and tokens  # the fine-tune worker, now running ia3
    signalled = time.monotonic()
    os.kill(child.pid, signal.SIGINT)
    out, err = child.communicate(timeout=30)
    took = time.monotonic() - signalled
    assert child.returncode == 130, err[-2000:]
    assert took < 15, f"{took:.1f} s from Ctrl-C to exit"
    assert "interrupted: writing the reports" in err
    data = json.loads(report.read_text())
    results = {r["name"]: r for r in data["results"]}
    assert results["finetune.methods[lora]"]["status"] == "pass"
    assert "held-out loss" in results["finetune.methods[lora]"]["message"]  # its own result, as it finished
    for name in ("ia3", "prompt_tuning"):
        r = results[f"finetune.methods[{name}]"]
        assert (r["status"], r["message"]) == ("skip", "interrupted")
    assert data["options"]["interrupted"] is True and data["exit_code"] == 130
    jsonschema.validate(data, load_schema())
    assert "finetune.methods[lora]" in prom.read_text()
    assert "peftnode_finetune_node_healthy 0.0" in prom.read_text()  # an interrupted run proves nothing
    assert "INTERRUPTED (exit 130)" in out
    cases = {c.get("name") for c in ET.parse(junit).getroot().iter("testcase")}
    assert any("lora" in c for c in cases) and any("ia3" in c for c in cases)
    assert "peftnode finetune" in out  # the console report
    assert all(gone(pid) for pid in pids), [p for p in pids if psutil.pid_exists(p)]
    assert not carrying(tokens)
