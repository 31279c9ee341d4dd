"""NVIDIA DCGM's own diagnostic (``dcgmi diag``), when the node has DCGM: one verdict per DCGM test.

``--quick`` runs level 1 (software and deployment checks, seconds); a full run level 2 (adds GPU
memory and PCIe tests, ~2 minutes). Level 3 (stress, ~15 minutes) is for a burn-in, not a verify.

The table DCGM prints is boxed: ``+---`` / ``+===`` rules, section rules (``+-----  Hardware  ---+``
or ``|-----  Metadata  ---|``), rows ``| name | value |``. A long value wraps onto the next rows
with an empty name cell, cut at a fixed width even inside a word; a test's result is ``Pass``,
``Fail``, ``Warn``, ``Skip`` or ``Not Run``, followed by the GPUs it applies to (DCGM 3:
``Fail - All``, ``Pass - GPUs: 1, 2``, ``Fail - GPU: 0``; DCGM 4: ``Pass`` then ``GPU0: Pass`` rows).
``Warning`` / ``Info`` / ``Error`` rows after a test carry its details.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field

from checks.gpu.commands import run_command
from checks.registry import Context, check
from checks.result import Status, Value, Verdict

QUICK_LEVEL = 1
FULL_LEVEL = 2
TIMEOUT_S = {QUICK_LEVEL: 120.0, FULL_LEVEL: 270.0}  # inside the check's own 300 s

RESULTS = ("Pass", "Fail", "Warn", "Skip", "Not Run")
SEVERITY = {"Not Run": 0, "Skip": 1, "Pass": 2, "Warn": 3, "Fail": 4}
DETAIL_KINDS = ("warning", "info", "error")
SECTION_RX = re.compile(r"^[+|]-{2,}\s+(\S.*?)\s+-{2,}[+|]")
RESULT_RX = re.compile(
    r"(?:GPU\s*(?P<gpu>\d+)\s*:\s*)?(?P<result>Pass|Fail|Warn|Skip|Not Run)\b"
    r"(?:\s*-\s*(?P<gpus>All\b|GPUs?\s*:?\s*\d+(?:\s*[,-]\s*\d+)*))?",
    re.IGNORECASE)


@dataclass
class DiagTest:
    name: str
    section: str | None
    result: str  # the worst result over its GPUs: Fail > Warn > Pass > Skip > Not Run
    gpus: dict[str, str] = field(default_factory=dict)  # result -> "All" or "0, 1, 2"
    details: list[tuple[str, str]] = field(default_factory=list)  # ("Warning", "GPU 0 ...")


@dataclass
class DiagReport:
    metadata: dict[str, str] = field(default_factory=dict)
    tests: list[DiagTest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # Error rows outside a test and error lines outside the table
    notes: list[str] = field(default_factory=list)  # Warning rows outside a test


def _canonical(result: str) -> str:
    return next(r for r in RESULTS if r.lower() == " ".join(result.split()).lower())


def _cells(line: str) -> tuple[str, str] | None:
    parts = line.split("|")
    if len(parts) < 4 or parts[0].strip():
        return None
    return parts[1], "|".join(parts[2:-1])


def parse_results(text: str) -> tuple[str, dict[str, str]] | None:
    """``Fail - GPU: 0`` / ``Pass - GPUs: 1, 2`` / ``Pass`` + ``GPU0: Pass`` ... -> (worst result, result -> GPUs);
    None when the text does not start with a result."""
    text = " ".join(text.split())
    if not RESULT_RX.match(text):
        return None
    gpus: dict[str, list[str]] = {}
    worst = None
    for m in RESULT_RX.finditer(text):
        result = _canonical(m.group("result"))
        if worst is None or SEVERITY[result] > SEVERITY[worst]:
            worst = result
        if m.group("gpu") is not None:
            gpus.setdefault(result, []).append(m.group("gpu"))
        elif m.group("gpus"):
            listed = m.group("gpus")
            gpus.setdefault(result, []).append("All" if listed.lower() == "all"
                                               else re.sub(r"^GPUs?\s*:?\s*", "", listed, flags=re.I))
    return worst, {k: ", ".join(v) for k, v in gpus.items()}


def parse_dcgmi_diag(text: str) -> DiagReport:
    """Parse ``dcgmi diag`` console output into metadata, tests (with results per GPU and details) and errors."""
    report = DiagReport()
    rows: list[tuple[str | None, str, str]] = []  # (section, name cell, raw value cell)
    section: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if stripped.startswith(("+", "|")):
            m = SECTION_RX.match(stripped)
            if m:
                section = m.group(1).strip()
                continue
            if re.fullmatch(r"\+[-=+]+\+?", stripped):
                continue
            cells = _cells(stripped)
            if cells:
                rows.append((section, cells[0], cells[1]))
        elif re.match(r"(Error\b|.*\bError:)", stripped):
            report.errors.append(stripped)
    if not rows:
        return report
    # A wrapped value is cut at a fixed width W: non-final pieces are exactly W characters (after the one
    # space of padding), so they are joined without trimming; runs of blanks are collapsed afterwards.
    width = max(max(len(v) - 3 for _, _, v in rows), max(len(v[1:].rstrip()) for _, _, v in rows))
    entries: list[list] = []  # [section, name, [raw value pieces]]
    for sec, name, value in rows:
        if name.strip():
            entries.append([sec, name.strip(), [value]])
        elif entries:
            entries[-1][2].append(value)
    last_test: DiagTest | None = None
    for sec, name, pieces in entries:
        joined = "".join(p[1:1 + width].ljust(width) for p in pieces[:-1]) + pieces[-1][1:]
        value = " ".join(joined.split())
        if name == "Diagnostic" and value == "Result":
            continue
        kind = name.split(":")[0].strip().lower()
        if kind in DETAIL_KINDS:
            label = name.split(":")[0].strip().capitalize()
            extra = name.split(":", 1)[1].strip() if ":" in name else ""
            detail = f"{extra} {value}".strip() if extra else value
            if last_test is not None and last_test.section == sec:
                last_test.details.append((label, detail))
                if kind == "error":
                    last_test.result = "Fail"
            elif kind == "error":
                report.errors.append(f"{sec + ': ' if sec else ''}{detail}")
            elif kind == "warning":
                report.notes.append(f"{sec + ': ' if sec else ''}{detail}")
            continue
        parsed = parse_results(value) if (sec or "").lower() != "metadata" else None
        if parsed is None:
            report.metadata[name] = value
            continue
        last_test = DiagTest(name, sec, parsed[0], parsed[1])
        report.tests.append(last_test)
    return report


def summarise_details(details: list[tuple[str, str]], kinds=("Warning", "Error"), limit: int = 400) -> str:
    """Group identical per-GPU texts: 'GPU 0 X', 'GPU 1 X' -> 'GPU 0, 1: X'."""
    groups: dict[str, list[str]] = {}
    for kind, text in details:
        if kind not in kinds:
            continue
        m = re.match(r"GPU\s*(\d+)\s*:?\s+(.*)", text)
        gpu, body = (m.group(1), m.group(2)) if m else (None, text)
        groups.setdefault(body, [])
        if gpu is not None:
            groups[body].append(gpu)
    parts = [f"GPU {', '.join(g)}: {body}" if g else body for body, g in groups.items()]
    out = "; ".join(parts)
    return out if len(out) <= limit else out[: limit - 1] + "\u2026"


def _fabric_hint(text: str) -> str:
    if "system not yet initialized" in text:
        return ("CUDA reports 'system not yet initialized' on NVSwitch systems (HGX/DGX) until nvidia-fabricmanager "
                "runs with the driver's exact version: `systemctl status nvidia-fabricmanager`. ")
    return ""


REMEDIATION_FAIL = ("Read DCGM's text above; rerun `dcgmi diag -r 3` on the idle node for detail. A GPU that fails "
                    "memory or hardware tests again after a reset (`nvidia-smi -r -i N`) needs replacement; check "
                    "`dmesg` for Xid errors and `nvidia-smi -q -d ECC,ROW_REMAPPER`.")


def judge_diag(report: DiagReport, level: int, returncode: int | None, output_tail: str = "") -> list[Verdict]:
    base = {"level": level}
    if "DCGM Version" in report.metadata:
        base["dcgm_version"] = report.metadata["DCGM Version"]
    if not report.tests:
        if report.errors:
            first = report.errors[0]
            hint = ("Start the DCGM host engine (`systemctl start nvidia-dcgm` or `nv-hostengine`) and rerun. "
                    if re.search(r"host ?engine|connect", first, re.I) else "")
            return [Verdict(Status.FAIL, f"dcgmi diag -r {level} did not run: {first}", base, {},
                            hint + _fabric_hint(first) + "Run `dcgmi diag -r 1` by hand to see the full message.")]
        last = output_tail.strip().splitlines()[-1] if output_tail.strip() else "no output"
        return [Verdict(Status.FAIL, f"dcgmi diag -r {level} printed no results table (exit code {returncode}): {last}",
                        base, {}, "Run `dcgmi diag -r 1` by hand; check that nv-hostengine runs.")]
    verdicts = []
    for test in report.tests:
        measured = dict(base, result=test.result)
        for result, listed in test.gpus.items():
            measured[f"gpus_{result.lower().replace(' ', '_')}"] = listed
        expected = {"result": "Pass"}
        listed = test.gpus.get(test.result)
        where = "" if not listed else (" on all GPUs" if listed == "All" else f" on GPU(s) {listed}")
        head = f"DCGM {test.name}: {test.result}{where}"
        details = summarise_details(test.details)
        if test.result == "Fail":
            verdicts.append(Verdict(Status.FAIL, f"{head}: {details}" if details else head, measured, expected,
                                    _fabric_hint(details) + REMEDIATION_FAIL, test.name))
        elif test.result == "Warn":
            verdicts.append(Verdict(Status.WARN, f"{head}: {details}" if details else head, measured, expected,
                                    "Read DCGM's warning; it does not stop fine-tuning but may cost speed.", test.name))
        elif test.result in ("Skip", "Not Run"):
            verdicts.append(Verdict(Status.SKIP, f"{head} (DCGM did not run this test)", measured, expected,
                                    subject=test.name))
        else:
            verdicts.append(Verdict(Status.PASS, head, measured, expected, subject=test.name))
    for error in report.errors:
        verdicts.append(Verdict(Status.FAIL, f"DCGM error: {error}", base, {},
                                _fabric_hint(error) + REMEDIATION_FAIL, "errors"))
    return verdicts


def run_dcgmi(binary: str, level: int) -> tuple[int | None, str]:
    """(exit code, whole output) of ``dcgmi diag -r <level>``, run with a deadline through the process
    layer (the whole tree killed past it). A run that did not end by itself gets an ``Error:`` line
    saying how, which the parser reports; its exit code is None."""
    timeout_s = TIMEOUT_S[level]
    done = run_command([binary, "diag", "-r", str(level)], timeout_s)
    if done.exit is None:
        return None, f"Error: dcgmi diag -r {level} did not start: {done.error}"
    if done.exit.timed_out or done.exit.signal:  # "timed out after 270 s and was killed", "crashed with SIGSEGV"
        return None, done.output + f"\nError: dcgmi diag -r {level} {done.exit.describe(timeout_s)}"
    return done.exit.code, done.output


@check("gpu.dcgm_diag", "NVIDIA DCGM diagnostic (dcgmi diag -r 1 quick, -r 2 full), when DCGM is installed",
       isolate=True, exclusive=True, needs=("gpu.driver",), needs_gpus=True, timeout_s=300)
def gpu_dcgm_diag(ctx: Context) -> list[Verdict]:
    binary = shutil.which("dcgmi")
    if binary is None:
        return [Verdict(Status.SKIP, "dcgmi (NVIDIA DCGM) is not on PATH; install datacenter-gpu-manager to add its "
                                     "diagnostic to this verify", {}, {})]
    level = QUICK_LEVEL if ctx.quick else FULL_LEVEL
    rc, text = run_dcgmi(binary, level)
    verdicts = judge_diag(parse_dcgmi_diag(text), level, rc, text[-2000:])
    for v in verdicts:
        v.measured.setdefault("command", Value(f"dcgmi diag -r {level}"))
    return verdicts
