"""The console report as a person sees it: built Reports rendered at fixed widths, and the real CLI run
inside a real pseudo-terminal (and tmux) at 80 and 120 columns."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

import checks
from checks.registry import Context
from checks.report import Report
from checks.report.console import problems, render_console, summary_line, summary_parts
from checks.result import Result, Status, Value
from checks.runner import run_checks
from tests.helpers.fake_checks import driver_missing as _driver_missing
from tests.helpers.fake_checks import fine as _fine
from tests.helpers.fake_checks import spec_of as _spec
from tests.helpers.fake_checks import toolkit_crashes as _toolkit_crashes
from tests.helpers.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
STARTED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
LONG = ("volatile uncorrectable ECC errors = 2 since the last driver load, aggregate = 7; retired pages pending; "
        "row remapping failed on bank 3 (see nvidia-smi -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER)")


def _report(results: list[Result], host: str = "gpu-node-01") -> Report:
    return Report(results=results, host={"hostname": host}, stack={"name": "cu124"}, started_at=STARTED,
                  finished_at=STARTED + timedelta(seconds=3.25))


def _mixed() -> list[Result]:
    """Every status, problems deliberately listed mildest first, in three groups."""
    return [
        Result("cuda.driver", "cuda", Status.WARN, "driver 535.54 is older than recommended 550",
               remediation="Upgrade the NVIDIA driver"),
        Result("python.torch", "python", Status.ERROR, "probe crashed: ImportError", remediation="Reinstall torch"),
        Result("gpu.count", "gpu", Status.PASS, "8 GPUs visible", measured={"count": Value(8)}),
        Result("gpu.ecc[gpu3]", "gpu", Status.FAIL, "volatile uncorrectable = 2",
               remediation="reset GPU 3 (nvidia-smi -r -i 3), then rerun"),
        Result("gpu.memory", "gpu", Status.PASS, "80 GiB per GPU"),
        Result("gpu.nvlink", "gpu", Status.SKIP, "no NVLink on this node"),
        Result("cuda.toolkit", "cuda", Status.PASS, "nvcc 12.4"),
    ]


def _render(report: Report, width: int, **kw) -> list[str]:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    render_console(report, console, **kw)
    return console.export_text().splitlines()


def _fits(lines: list[str], width: int) -> None:
    too_wide = [line for line in lines if cell_len(line) > width]
    assert not too_wide, f"lines wider than {width} columns: {too_wide}"


# --------------------------------------------------------------------------- built reports


def test_problems_first_worst_first_one_line_each_with_the_remediation():
    lines = _render(_report(_mixed()), 100)
    assert lines[0] == "peftnode verify on gpu-node-01, stack cu124, 2024-05-01 12:00:00 UTC, 3.2 s"
    # fail, then error, then warn, straight under the header, each on one line with its remediation
    assert lines[1] == ("FAIL  gpu.ecc[gpu3]  volatile uncorrectable = 2  → reset GPU 3 (nvidia-smi -r -i 3), "
                        "then rerun")
    assert lines[2] == "ERROR python.torch   probe crashed: ImportError  → Reinstall torch"
    assert lines[3] == "WARN  cuda.driver    driver 535.54 is older than recommended 550  → Upgrade the NVIDIA driver"
    assert lines[4] == ""


def test_passes_and_skips_collapse_to_a_count_per_group():
    lines = _render(_report(_mixed()), 100)
    # groups in the run's order; statuses mildest first; nothing that passed or skipped is named
    assert lines[5:8] == ["cuda:    1 pass, 1 warn", "python:  1 error", "gpu:     2 pass, 1 skip, 1 fail"]
    text = "\n".join(lines)
    for name in ("gpu.count", "gpu.memory", "gpu.nvlink", "cuda.toolkit"):
        assert name not in text
    assert lines[8:] == ["7 checks: 3 pass, 1 skip, 1 warn, 1 error, 1 fail in 3.2 s -> UNHEALTHY (exit 1)"]






def _blocked_report() -> Report:
    """A real runner run: cuda.toolkit errors and blocks one check; gpu.driver fails and blocks three (one
    through cuda.torch), so gpu.driver is the first root cause though cuda.toolkit ran first."""
    specs = [_spec("cuda.toolkit", _toolkit_crashes), _spec("cuda.nvcc_works", _fine, ("cuda.toolkit",)),
             _spec("system.os", _fine), _spec("python.late", _driver_missing),
             _spec("gpu.driver", _driver_missing), _spec("gpu.ecc", _fine, ("gpu.driver",)),
             _spec("cuda.torch", _fine, ("gpu.driver",)), _spec("perf.gemm", _fine, ("cuda.torch",))]
    return _report(run_checks(specs, Context(stack={}), jobs=2))


def test_blocked_skips_are_summed_by_root_cause_and_the_root_cause_leads():
    report = _blocked_report()
    assert [r.name for r in problems(report)] == ["gpu.driver", "python.late", "cuda.toolkit"]
    lines = _render(report, 120)
    assert [line.split()[:2] for line in lines[1:4]] == [["FAIL", "gpu.driver"], ["FAIL", "python.late"],
                                                         ["ERROR", "cuda.toolkit"]]
    assert "cuda:    2 skip (2 blocked: cuda.toolkit 1, gpu.driver 1), 1 error" in lines
    assert "gpu:     1 skip (1 blocked by gpu.driver), 1 fail" in lines
    assert "perf:    1 skip (1 blocked by gpu.driver)" in lines
    assert lines[-2:] == ["8 checks: 1 pass, 4 skip (4 blocked), 0 warn, 1 error, 2 fail in 3.2 s -> UNHEALTHY "
                          "(exit 1);", "2 root causes (gpu.driver: 3, cuda.toolkit: 1) blocked 4 checks"]


def test_a_long_problem_takes_two_lines_cut_to_80_columns_with_an_ellipsis():
    result = Result("gpu.ecc[gpu3]", "gpu", Status.FAIL, LONG,
                    remediation="drain the node, reset GPU 3 (nvidia-smi -r -i 3), rerun peftnode verify; if the "
                                "count grows again open an RMA with the serial from the JSON report")
    lines = _render(_report([result]), 80)
    _fits(lines, 80)
    first, second = lines[1], lines[2]
    assert first.startswith("FAIL  gpu.ecc[gpu3]  volatile uncorrectable ECC errors = 2")
    assert first.endswith("…") and cell_len(first) == 80
    assert second.startswith("      → drain the node, reset GPU 3") and second.endswith("…")
    assert cell_len(second) == 80
    assert lines[3] == ""  # then the group counts: two lines for the problem, not a 10-line cell
    # a wider console shows more of the same message
    wide = _render(_report([result]), 160)
    assert wide[1].startswith(first[:-1]) and len(wide[1]) > len(first)


def test_a_short_problem_keeps_one_line_and_a_problem_without_remediation_never_takes_two():
    lines = _render(_report([Result("gpu.ecc[gpu3]", "gpu", Status.FAIL, LONG)]), 80)
    assert lines[1].startswith("FAIL  gpu.ecc[gpu3]  volatile") and lines[1].endswith("…")
    assert lines[2] == ""


def test_newlines_in_a_message_do_not_break_the_line():
    result = Result("gpu.xid", "gpu", Status.FAIL, "Xid 79 on GPU 2\n  fallen off the bus\n", remediation="Drain\nnode")
    lines = _render(_report([result]), 80)
    assert lines[1] == "FAIL  gpu.xid  Xid 79 on GPU 2 fallen off the bus  → Drain node"


def test_names_with_brackets_are_not_rich_markup():
    names = ["gpu.ecc[gpu3]", "python.packages[bold]", "perf.gemm[/]", "x.y[red]z[/red]"]
    results = [Result(n, n.split(".")[0], Status.FAIL, f"broken [b]{i}[/b]", remediation="[i]fix[/i]")
               for i, n in enumerate(names)]
    text = "\n".join(_render(_report(results), 120, verbose=True))
    for i, name in enumerate(names):
        assert f"FAIL  {name}" in text and f"broken [b]{i}[/b]" in text
    assert "→ [i]fix[/i]" in text


def test_every_failing_name_stays_whole_even_when_it_fills_a_narrow_line():
    name = "python.packages[nvidia-cudnn-cu11-long-name]"  # 44 columns: no room for a message beside it at 50
    lines = _render(_report([Result(name, "python", Status.FAIL, LONG, remediation="pip install it")]), 50)
    _fits(lines, 50)
    assert lines[1] == f"FAIL  {name}"
    assert lines[2].startswith("      volatile uncorrectable") and lines[2].endswith("…")
    assert lines[3] == "      → pip install it"


def test_a_remediation_that_does_not_fit_beside_its_message_gets_its_own_line():
    result = Result("gpu.ecc[gpu3]", "gpu", Status.FAIL, "volatile uncorrectable = 2",
                    remediation="reset GPU 3 (nvidia-smi -r -i 3), then rerun")
    assert _render(_report([result]), 80)[1:3] == ["FAIL  gpu.ecc[gpu3]  volatile uncorrectable = 2",
                                                    "      → reset GPU 3 (nvidia-smi -r -i 3), then rerun"]
    assert _render(_report([result]), 95)[1] == ("FAIL  gpu.ecc[gpu3]  volatile uncorrectable = 2  → reset GPU 3 "
                                                 "(nvidia-smi -r -i 3), then rerun")


def test_fifty_gpus_failing_stay_one_line_each_at_80_columns():
    results = [Result(f"gpu.ecc[gpu{i}]", "gpu", Status.FAIL, f"volatile uncorrectable = {i + 1}",
                      remediation=f"reset GPU {i} (nvidia-smi -r -i {i}), then rerun") for i in range(50)]
    results += [Result(f"gpu.throttle[gpu{i}]", "gpu", Status.PASS, "no throttling") for i in range(50)]
    lines = _render(_report(results), 80)
    _fits(lines, 80)
    fail_lines = [line for line in lines if line.startswith("FAIL")]
    assert len(fail_lines) == 50
    for i, line in enumerate(fail_lines):
        assert line.startswith(f"FAIL  gpu.ecc[gpu{i}]")
        assert f"volatile uncorrectable = {i + 1}  → reset GPU {i} (nvidia-smi -" in line and line.endswith("…")
    # header + 50 one-line failures + blank + one group line + the summary on two lines
    assert len(lines) == 1 + 50 + 1 + 1 + 2, lines
    assert "gpu:  50 pass, 50 fail" in lines


def test_verbose_lists_every_result_one_line_each_under_its_group():
    report = _report(_mixed())
    lines = _render(report, 80, verbose=True)
    _fits(lines, 80)
    by_group: dict[str, list[str]] = {}
    group = None
    for line in lines[lines.index("") + 1:-1]:
        if not line.startswith("  "):
            group = line.split(":")[0]
        else:
            by_group.setdefault(group, []).append(line.split()[1])
    assert by_group == {"cuda": ["cuda.driver", "cuda.toolkit"], "python": ["python.torch"],
                        "gpu": ["gpu.count", "gpu.ecc[gpu3]", "gpu.memory", "gpu.nvlink"]}
    assert "  PASS  gpu.count" in "\n".join(lines) and "(count=8)" in "\n".join(lines)  # measured values too
    assert lines[1:lines.index("")] == [
        "FAIL  gpu.ecc[gpu3]  volatile uncorrectable = 2", "      → reset GPU 3 (nvidia-smi -r -i 3), then rerun",
        "ERROR python.torch   probe crashed: ImportError  → Reinstall torch",
        "WARN  cuda.driver    driver 535.54 is older than recommended 550", "      → Upgrade the NVIDIA driver"]
    assert len(lines) == 1 + 5 + 1 + 3 + 7 + 1


def test_failed_only_shows_the_problems_and_the_summary():
    lines = _render(_report(_mixed()), 80, failed_only=True)
    assert [line.split()[0] for line in lines[:5]] == ["FAIL", "→", "ERROR", "WARN", "→"]
    assert lines[5:] == ["7 checks: 3 pass, 1 skip, 1 warn, 1 error, 1 fail in 3.2 s -> UNHEALTHY (exit 1)"]
    healthy = _render(_report([r for r in _mixed() if r.status in (Status.PASS, Status.SKIP)]), 80, failed_only=True)
    assert healthy == ["4 checks: 3 pass, 1 skip, 0 warn, 0 error, 0 fail in 3.2 s -> HEALTHY (exit 0)"]


def test_healthy_and_empty_reports():
    lines = _render(_report([r for r in _mixed() if r.status != Status.FAIL and r.status != Status.ERROR]), 80)
    assert lines[-1] == "5 checks: 3 pass, 1 skip, 1 warn, 0 error, 0 fail in 3.2 s -> HEALTHY (exit 0)"
    empty = _render(_report([]), 80)
    assert empty[1:] == ["no checks ran",
                         "0 checks: 0 pass, 0 skip, 0 warn, 0 error, 0 fail in 3.2 s -> HEALTHY (exit 0)"]


def test_summary_wraps_between_its_parts_at_80_columns():
    report = _blocked_report()
    lines = _render(report, 80)
    summary = lines[-3:]
    _fits(summary, 80)
    assert " ".join(summary) == summary_line(report)
    assert summary == ["8 checks: 1 pass, 4 skip (4 blocked), 0 warn, 1 error, 2 fail in 3.2 s",
                       "-> UNHEALTHY (exit 1);", "2 root causes (gpu.driver: 3, cuda.toolkit: 1) blocked 4 checks"]
    assert all(any(part in line for line in summary) for part in summary_parts(report))


def test_a_long_host_name_gives_way_in_the_header():
    host = "gpu-node-0042.rack-17.hall-b.training-cluster.example.internal"
    header = _render(_report(_mixed(), host=host), 80)[0]
    assert cell_len(header) <= 80
    assert header.startswith("peftnode verify on gpu-node-0042") and "…, stack cu124, 2024-05-01 12:00:00 UTC" in header


def test_colours_are_rich_styles_and_only_the_status_word_is_red():
    console = Console(record=True, width=120, file=io.StringIO(), color_system="standard", force_terminal=True)
    render_console(_report(_mixed()), console, verbose=True)
    ansi = console.export_text(styles=True)

    def sgr_before(word: str) -> list[str]:
        match = re.search(r"\x1b\[([\d;]*)m" + re.escape(word), ansi)
        assert match, f"{word} is not styled"
        return match.group(1).split(";")

    assert "31" in sgr_before("FAIL")  # red
    assert "32" in sgr_before("PASS")  # green
    assert "35" in sgr_before("ERROR")  # magenta
    assert "33" in sgr_before("WARN")  # yellow
    assert "2" in sgr_before("SKIP")  # dim
    assert "36" in sgr_before("→ reset GPU 3")  # the remediation stands out in cyan
    assert "31" not in sgr_before("gpu.ecc[gpu3]")  # the red ends with the status word
    assert re.search(r"\x1b\[([\d;]*)m[^\x1b]*volatile", ansi).group(1) == "0"  # the message itself is plain


def test_a_console_that_cannot_write_unicode_gets_ascii_arrows_and_ellipses():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    console = Console(file=stream, width=80, color_system=None)
    result = Result("gpu.ecc[gpu3]", "gpu", Status.FAIL, LONG, remediation="reset GPU 3")
    render_console(_report([result]), console)  # a "→" would raise UnicodeEncodeError here
    stream.flush()
    lines = stream.buffer.getvalue().decode("ascii").splitlines()
    assert lines[1].endswith("...") and cell_len(lines[1]) == 80
    assert lines[2] == "      -> reset GPU 3"


# --------------------------------------------------------------------------- the real CLI in a real terminal

VERIFY = Path(sys.executable).parent / "peftnode-verify"
CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[=>]")


def _verify_argv(*args: str) -> list[str]:
    """The installed console script (what a person types), else the module."""
    base = [str(VERIFY)] if VERIFY.exists() else [sys.executable, "-m", "checks.cli"]
    return [*base, "--stack", "cu117", "--quick", *args]


def _child_env() -> dict[str, str]:
    """This environment minus what would size or colour the console from outside the terminal, and no CI step
    summary to append to."""
    drop = {"COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERM",
            "GITHUB_STEP_SUMMARY"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "TERM": "xterm-256color"}


def _in_pty(argv: list[str], columns: int, rows: int = 50, timeout: float = 120) -> tuple[int, list[str]]:
    """Run ``argv`` with a pseudo-terminal of ``columns`` x ``rows`` as its stdin, stdout and stderr; its exit
    code and the screen's lines, escape sequences removed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(argv, cwd=ROOT, env=_child_env(), stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                proc.kill()
                pytest.fail(f"{argv} did not finish within {timeout} s")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    code = proc.wait(timeout=30)
    text = CSI.sub("", b"".join(chunks).decode())
    return code, text.replace("\r\n", "\n").rstrip("\n").split("\n")


def _bound(doc: dict) -> int:
    """The most lines the default console may take for a report: the header, two per problem, a blank line,
    one per group and the summary (at most three lines)."""
    problems_n = sum(1 for r in doc["results"] if r["status"] in ("fail", "error", "warn"))
    groups = {r["group"] for r in doc["results"]}
    return 1 + 2 * problems_n + 1 + len(groups) + 3


def _failing(doc: dict) -> list[str]:
    names = [r["name"] for r in doc["results"] if r["status"] in ("fail", "error")]
    assert names, "this test needs a node that fails the cu117 stack (this machine: no GPU driver, Python 3.11)"
    return names


def _shows_whole(lines: list[str], status: str, name: str) -> bool:
    """A line starts with the status and the whole name, followed by a blank or the line's end."""
    return any(re.match(rf"{status.upper()} +{re.escape(name)}( |$)", line) for line in lines)


@pytest.mark.parametrize("columns", [80, 120])
def test_the_cli_in_a_real_terminal_fits_its_width_and_names_every_failure(columns, tmp_path):
    report = tmp_path / "r.json"
    code, lines = _in_pty(_verify_argv("--no-progress", "--json", str(report)), columns)
    doc = json.loads(report.read_text())
    assert code == doc["exit_code"] == 1
    _fits(lines, columns)
    assert len(lines) <= _bound(doc), "\n".join(lines)
    assert len(lines) <= 60  # 37 results here: 36 lines; the table this replaced took 743 at 80 columns, 262 at 120
    for r in doc["results"]:
        if r["status"] in ("fail", "error", "warn"):
            assert _shows_whole(lines, r["status"], r["name"]), f"{r['name']} not visible:\n" + "\n".join(lines)
        else:
            assert not any(r["name"] in line for line in lines), f"{r['name']} passed or skipped yet is listed"
    summary = " ".join(lines[lines.index(next(line for line in lines if re.match(r"\d+ checks: ", line))):])
    counts = ", ".join(f"{n} {label}" for label, n in doc["counts"].items())  # the "(N blocked)" aside removed
    assert re.sub(r" \(\d+ blocked\)", "", summary).startswith(f"{len(doc['results'])} checks: {counts} in ")
    assert "-> UNHEALTHY (exit 1)" in summary and ("root cause" in summary) == bool(doc["blocked_by"])
    if columns == 120:  # a wider terminal shows more of the same lines, not more lines
        _, narrow = _in_pty(_verify_argv("--no-progress"), 80)
        assert len(lines) <= len(narrow)
        assert sum(map(len, lines)) > sum(map(len, narrow))


def test_failed_only_in_a_real_terminal(tmp_path):
    report = tmp_path / "r.json"
    code, lines = _in_pty(_verify_argv("--no-progress", "--failed-only", "--json", str(report)), 80)
    doc = json.loads(report.read_text())
    assert code == 1
    _fits(lines, 80)
    assert not [line for line in lines if re.match(r"( *(PASS|SKIP) |[a-z]+: +\d+ (pass|skip|warn|error|fail))", line)]
    assert not any(line.startswith("peftnode verify on") for line in lines)
    for name in _failing(doc):
        assert _shows_whole(lines, next(r["status"] for r in doc["results"] if r["name"] == name), name)
    problems_n = sum(1 for r in doc["results"] if r["status"] in ("fail", "error", "warn"))
    assert len(lines) <= 2 * problems_n + 3


def test_verbose_in_a_real_terminal_lists_every_result(tmp_path):
    report = tmp_path / "r.json"
    code, lines = _in_pty(_verify_argv("--no-progress", "--verbose", "--json", str(report)), 80)
    doc = json.loads(report.read_text())
    assert code == 1
    _fits(lines, 80)
    listed = [line.split()[1] for line in lines if re.match(r"  (PASS|SKIP|WARN|ERROR|FAIL) ", line)]
    assert listed == [r["name"] for group in dict.fromkeys(r["group"] for r in doc["results"])
                      for r in doc["results"] if r["group"] == group]


def test_tmux_at_80_columns_shows_every_failure_without_wrapping(tmp_path):
    """The default run (live progress included) in a real terminal emulator: what is left on the screen."""
    tmux = require_tool("tmux", "the console test renders the CLI in a real terminal emulator")
    report = tmp_path / "r.json"
    sock = tmp_path / "tmux.sock"
    base = [tmux, "-u", "-S", str(sock), "-f", "/dev/null"]
    script = tmp_path / "run.sh"
    script.write_text(" ".join(f"'{a}'" for a in _verify_argv("--json", str(report))) + "\necho __DONE__ $?\n"
                      "sleep 120\n")
    subprocess.run([*base, "new-session", "-d", "-x", "80", "-y", "50", "-s", "verify", "sh", str(script)],
                   cwd=ROOT, env=_child_env(), check=True, timeout=30)
    try:
        deadline = time.monotonic() + 120
        while "__DONE__" not in (screen := _capture(base)):
            assert time.monotonic() < deadline, screen
            time.sleep(0.2)
        joined = _capture(base, "-J")  # wrapped rows joined back into lines: the same count when nothing wrapped
    finally:
        subprocess.run([*base, "kill-server"], timeout=30)
    rows = screen.rstrip("\n").split("\n")
    rows = rows[: next(i for i, row in enumerate(rows) if row.startswith("__DONE__"))]
    assert "__DONE__ 1" in screen  # the exit code: unhealthy
    assert len(joined.rstrip("\n").split("\n")) == len(screen.rstrip("\n").split("\n")), "a line wrapped"
    _fits(rows, 80)
    doc = json.loads(report.read_text())
    assert len(rows) <= _bound(doc), "\n".join(rows)
    for name in _failing(doc):
        status = next(r["status"] for r in doc["results"] if r["name"] == name)
        assert _shows_whole(rows, status, name), f"{name} not on the screen:\n" + "\n".join(rows)


def _capture(base: list[str], *flags: str) -> str:
    return subprocess.run([*base, "capture-pane", "-p", *flags, "-S", "-", "-E", "-", "-t", "verify"],
                          capture_output=True, text=True, check=True, timeout=30).stdout


def test_json_dash_puts_the_report_on_stdout_and_the_console_on_stderr():
    proc = subprocess.run(_verify_argv("--no-progress", "--json", "-"), cwd=ROOT, env=_child_env(),
                          capture_output=True, text=True, timeout=120)
    doc = json.loads(proc.stdout)  # nothing but the report
    assert proc.returncode == doc["exit_code"] == 1
    assert doc["schema"] == "peftnode.verify.report/1" and len(doc["results"]) > 10
    assert proc.stderr.startswith("peftnode verify on ") and "-> UNHEALTHY (exit 1)" in proc.stderr
    for name in _failing(doc):
        assert name in proc.stderr


def test_version_prints_the_package_version_and_exits_0():
    proc = subprocess.run([*_verify_argv()[:-3], "--version"], cwd=ROOT, env=_child_env(), capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"peftnode verify {checks.__version__}\n", "")
