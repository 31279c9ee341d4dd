"""JUnit XML for CI systems: one <testcase> per result inside a single "peftnode" <testsuite>."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from datetime import timezone
from pathlib import Path

import checks
from checks.report import Report
from checks.result import Result, Status

# Characters XML 1.0 cannot carry at all, even escaped (most C0 controls, surrogates, U+FFFE/FFFF).
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _clean(text: object) -> str:
    return _ILLEGAL_XML.sub("\ufffd", str(text))


def _seconds(value: float) -> str:
    return f"{max(value, 0.0):.3f}"


def _details(result: Result, blocked: int = 0) -> str:
    """Body text of a <failure>/<error>/<system-out>: message, values, remediation, and how many
    checks this one blocked."""
    lines = [result.message]
    if blocked:
        lines.append(f"blocked: {blocked} check(s) that need {result.name} were skipped")
    if result.measured:
        lines.append("measured: " + ", ".join(f"{k}={v}" for k, v in result.measured.items()))
    if result.expected:
        lines.append("expected: " + ", ".join(f"{k}={v}" for k, v in result.expected.items()))
    if result.remediation:
        lines.append(f"remediation: {result.remediation}")
    return _clean("\n".join(lines))


def _testcase(parent: ET.Element, result: Result, blocked: int = 0) -> None:
    case = ET.SubElement(
        parent,
        "testcase",
        classname=_clean(f"peftnode.{result.group}"),
        name=_clean(result.name),
        time=_seconds(result.duration_s),
    )
    message = _clean(result.message)
    if result.status == Status.FAIL:
        ET.SubElement(case, "failure", message=message, type="fail").text = _details(result, blocked)
    elif result.status == Status.ERROR:
        ET.SubElement(case, "error", message=message, type="error").text = _details(result, blocked)
    elif result.status == Status.SKIP:
        # A blocked skip's message names its blocker: "blocked by gpu.driver (driver not loaded)".
        ET.SubElement(case, "skipped", message=message)
    elif result.status == Status.WARN:
        ET.SubElement(case, "system-out").text = "WARN: " + _details(result)


def _blocked_notes(results: list[Result], blocked: dict[str, int]) -> dict[int, int]:
    """Which testcase carries each root cause's count: the root check's first failed or errored
    result (a check with subjects reports as ``name[subject]``)."""
    notes: dict[int, int] = {}
    for root, count in blocked.items():
        for index, result in enumerate(results):
            if result.status >= Status.ERROR and (result.name == root or result.name.startswith(root + "[")):
                notes[index] = count
                break
    return notes


def to_junit_element(report: Report) -> ET.Element:
    counts = report.counts()
    blocked = report.blocked_by()
    totals = {
        "tests": str(len(report.results)),
        "failures": str(counts["fail"]),
        "errors": str(counts["error"]),
        "skipped": str(counts["skip"]),
        "time": _seconds(report.duration_s),
    }
    root = ET.Element("testsuites", name=report.title, **totals)
    started = report.started_at
    if started.tzinfo is not None:
        started = started.astimezone(timezone.utc)
    suite = ET.SubElement(
        root,
        "testsuite",
        name="peftnode",
        **totals,
        timestamp=started.strftime("%Y-%m-%dT%H:%M:%S"),
        hostname=_clean(report.host.get("hostname") or "unknown"),
    )
    properties = ET.SubElement(suite, "properties")
    props = {
        "peftnode_version": checks.__version__,
        "stack": report.stack.get("name"),
        "stack_source": report.stack.get("source"),
        "status": report.status.label,
        "exit_code": report.exit_code,
        "blocked_by": ", ".join(f"{root}={n}" for root, n in blocked.items()) or None,
    }
    for key, value in props.items():
        if value is not None:
            ET.SubElement(properties, "property", name=key, value=_clean(value))
    noted = _blocked_notes(report.results, blocked)
    for index, result in enumerate(report.results):
        _testcase(suite, result, noted.get(index, 0))
    return root


def render_junit(report: Report) -> str:
    root = to_junit_element(report)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(report: Report, path: str | os.PathLike) -> Path:
    """Write the JUnit XML report to ``path`` and return the path."""
    target = Path(path)
    target.write_text(render_junit(report), encoding="utf-8")
    return target
