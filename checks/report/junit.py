"""JUnit XML for CI systems, valid against the ``junit-10.xsd`` that Jenkins' xunit plugin validates with.

Shape (what that schema allows, and what this module relies on it allowing):

- ``<testsuites name tests failures errors time>``: the run. The schema has no ``skipped`` here; the skips
  are counted on each suite.
- one ``<testsuite>`` per check group (system, python, gpu, ...) in the order the groups first appear in the
  report, with its own ``tests failures errors skipped time``, ``timestamp`` (the run's start, UTC) and
  ``hostname``. Its ``time`` adds each check's duration once, however many results the check reported.
  Its ``<properties>`` carry the run's identity (version, stack, run status and exit code) and, on the
  suite holding a root cause, ``blocked_by``.
- one ``<testcase classname="peftnode.<group>" name="<result>">`` per result. A check that reports several
  results (one per part: ``gpu.ecc[gpu0]`` ... ``gpu.ecc[gpu7]``) measured one duration for all of them:
  its cases carry no ``time`` (optional in the schema) rather than a copy or an invented share, and say
  in ``<system-out>`` how long the whole check took. A check with one result keeps its duration.
- ``fail`` -> ``<failure>``, ``error`` -> ``<error>`` (message, values, remediation; the root check of
  blocked ones says how many it blocked), ``skip`` -> ``<skipped>``, ``warn`` passes with a note in
  ``<system-out>``. The schema has no per-testcase ``<properties>``, so the GPU a result is about (index,
  UUID, PCI bus id, serial) is written into ``<system-out>`` and into the failure/error body.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import timezone
from pathlib import Path

import checks
from checks.report import Report
from checks.result import GpuId, Result, Status

# Characters XML 1.0 cannot carry at all, even escaped (most C0 controls, surrogates, U+FFFE/FFFF).
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _clean(text: object) -> str:
    return _ILLEGAL_XML.sub("\ufffd", str(text))


def _seconds(value: float) -> str:
    """Seconds as the schema's time type takes them: plain digits, at most three decimals, never negative."""
    if not math.isfinite(value) or value < 0:
        value = 0.0
    return f"{value:.3f}"


def check_name(result: Result) -> str:
    """The check a result came from: ``gpu.ecc`` for ``gpu.ecc[gpu3]``."""
    name = result.name
    if name.endswith("]") and "[" in name:
        return name[: name.index("[")]
    return name


def gpu_text(gpu: GpuId) -> str:
    """``gpu 3: uuid GPU-..., pci_bus_id 00000000:3B:00.0, serial 1650...`` (unknown fields left out)."""
    parts = [f"{label} {value}" for label, value in
             (("uuid", gpu.uuid), ("pci_bus_id", gpu.pci_bus_id), ("serial", gpu.serial)) if value]
    return f"gpu {gpu.index}" + (": " + ", ".join(parts) if parts else "")


def _details(result: Result, blocked: int = 0) -> str:
    """Body text of a <failure>/<error>: message, the GPU, values, remediation, and how many checks this
    one blocked."""
    lines = [result.message]
    if result.gpu is not None:
        lines.append(gpu_text(result.gpu))
    if blocked:
        lines.append(f"blocked: {blocked} check(s) that need {check_name(result)} were skipped")
    if result.measured:
        lines.append("measured: " + ", ".join(f"{k}={v}" for k, v in result.measured.items()))
    if result.expected:
        lines.append("expected: " + ", ".join(f"{k}={v}" for k, v in result.expected.items()))
    if result.remediation:
        lines.append(f"remediation: {result.remediation}")
    return _clean("\n".join(lines))


def _testcase(parent: ET.Element, result: Result, parts: int, blocked: int = 0) -> None:
    attrs = {"classname": _clean(f"peftnode.{result.group}"), "name": _clean(result.name)}
    if parts == 1:
        attrs["time"] = _seconds(result.duration_s)
    case = ET.SubElement(parent, "testcase", attrs)
    message = _clean(result.message)
    if result.status == Status.FAIL:
        ET.SubElement(case, "failure", message=message, type="fail").text = _details(result, blocked)
    elif result.status == Status.ERROR:
        ET.SubElement(case, "error", message=message, type="error").text = _details(result, blocked)
    elif result.status == Status.SKIP:
        # A blocked skip's message names its blocker: "blocked by gpu.driver (driver not loaded)".
        ET.SubElement(case, "skipped", message=message)
    out = []
    if result.status == Status.WARN:
        out.append("WARN: " + _details(result))
    elif result.gpu is not None:
        out.append(gpu_text(result.gpu))
    if parts > 1:
        out.append(f"time: {check_name(result)} took {_seconds(result.duration_s)} s for its {parts} results together")
    if out:
        ET.SubElement(case, "system-out").text = _clean("\n".join(out))


def _blocked_notes(results: list[Result], blocked: dict[str, int]) -> dict[int, int]:
    """Which testcase carries each root cause's count: the root check's first failed or errored
    result (a check with subjects reports as ``name[subject]``)."""
    notes: dict[int, int] = {}
    for root, count in blocked.items():
        for index, result in enumerate(results):
            if result.status >= Status.ERROR and check_name(result) == root:
                notes[index] = count
                break
    return notes


def _suite_time(results: list[Result]) -> float:
    """Each check's duration once: its parts share one measured duration."""
    per_check: dict[str, float] = {}
    for result in results:
        duration = result.duration_s if math.isfinite(result.duration_s) and result.duration_s > 0 else 0.0
        key = check_name(result)
        per_check[key] = max(per_check.get(key, 0.0), duration)
    return sum(per_check.values())


def _counts(results: list[Result]) -> dict[str, str]:
    tally = Counter(r.status for r in results)
    return {
        "tests": str(len(results)),
        "failures": str(tally[Status.FAIL]),
        "errors": str(tally[Status.ERROR]),
        "skipped": str(tally[Status.SKIP]),
    }


def to_junit_element(report: Report) -> ET.Element:
    counts = _counts(report.results)
    del counts["skipped"]  # junit-10.xsd has no `skipped` on <testsuites>
    root = ET.Element("testsuites", name=_clean(report.title), **counts, time=_seconds(report.duration_s))

    started = report.started_at
    if started.tzinfo is not None:
        started = started.astimezone(timezone.utc)
    timestamp = started.strftime("%Y-%m-%dT%H:%M:%S")
    hostname = _clean(report.host.get("hostname") or "unknown")
    run_props = {
        "peftnode_version": checks.__version__,
        "stack": report.stack.get("name"),
        "stack_source": report.stack.get("source"),
        "run_status": report.status.label,
        "run_exit_code": report.exit_code,
    }

    blocked = report.blocked_by()
    noted = _blocked_notes(report.results, blocked)
    parts = Counter((r.group, check_name(r)) for r in report.results)
    groups: dict[str, list[int]] = {}
    for index, result in enumerate(report.results):
        groups.setdefault(result.group, []).append(index)
    # Each root cause is counted on the suite of the check that caused it (the first suite, should that
    # check have reported nothing).
    first_group = next(iter(groups), None)
    root_group = {root: next((r.group for r in report.results if check_name(r) == root), first_group)
                  for root in blocked}

    for group, indices in groups.items():
        results = [report.results[i] for i in indices]
        suite = ET.SubElement(
            root,
            "testsuite",
            name=_clean(f"peftnode.{group}"),
            **_counts(results),
            time=_seconds(_suite_time(results)),
            timestamp=timestamp,
            hostname=hostname,
        )
        props = dict(run_props)
        props["blocked_by"] = ", ".join(f"{r}={n}" for r, n in blocked.items() if root_group[r] == group) or None
        properties = ET.SubElement(suite, "properties")
        for key, value in props.items():
            if value is not None:
                ET.SubElement(properties, "property", name=key, value=_clean(value))
        for index, result in zip(indices, results, strict=True):
            _testcase(suite, result, parts[(result.group, check_name(result))], noted.get(index, 0))
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
