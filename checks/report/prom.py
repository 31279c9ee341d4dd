"""Prometheus textfile-collector output (for node_exporter's ``--collector.textfile.directory``).

The file is written atomically: a temporary file in the same directory, then ``os.replace``, so
node_exporter never reads half a file. Its name starts with a dot and does not end in ``.prom``,
so the collector ignores it even while it exists.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import checks
from checks.report import Report
from checks.result import Status

_HEALTHY_STATUSES = (Status.PASS, Status.SKIP, Status.WARN)


def escape_label(value: object) -> str:
    """Escape a label value for the text exposition format: backslash, double quote, newline."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _labels(labels: dict[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{escape_label(val)}"' for key, val in labels.items()) + "}"


class _Metrics:
    """Collects samples per metric family so each family's HELP/TYPE comes once, before its samples."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, list[str]]] = {}

    def family(self, name: str, help_text: str) -> None:
        self._families.setdefault(name, (help_text, []))

    def add(self, metric: str, value: float | int | bool, labels: dict[str, object] | None = None) -> None:
        self._families[metric][1].append(f"{metric}{_labels(labels or {})} {format_value(value)}")

    def render(self) -> str:
        lines: list[str] = []
        for name, (help_text, samples) in self._families.items():
            lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} gauge")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def render_prom(report: Report) -> str:
    """The report as Prometheus text exposition format (all gauges)."""
    m = _Metrics()
    m.family(
        "peftnode_check_status",
        "Status of a peftnode check as a severity code: 0 pass, 1 skip, 2 warn, 3 error, 4 fail.",
    )
    m.family("peftnode_check_ok", "1 if the check passed, was skipped or warned; 0 on fail or error.")
    m.family("peftnode_check_duration_seconds", "How long the check took to run, in seconds.")
    m.family(
        "peftnode_check_measurement",
        "A numeric value a check measured; the name label says which, the unit label its unit (empty if none).",
    )
    m.family("peftnode_verify_healthy", "1 if the last peftnode verify run was healthy (no fail or error), else 0.")
    m.family("peftnode_verify_last_run_timestamp_seconds", "Unix time at which the last peftnode verify run finished.")
    m.family("peftnode_verify_info", "Stack and peftnode version of the last verify run; always 1.")

    for result in report.results:
        labels = {"check": result.name, "group": result.group}
        m.add("peftnode_check_status", int(result.status), labels)
        m.add("peftnode_check_ok", 1 if result.status in _HEALTHY_STATUSES else 0, labels)
        m.add("peftnode_check_duration_seconds", float(result.duration_s), labels)
        for key, measured in result.measured.items():
            if _is_number(measured.value):
                m.add(
                    "peftnode_check_measurement", measured.value, {**labels, "name": key, "unit": measured.unit or ""}
                )

    m.add("peftnode_verify_healthy", 1 if report.exit_code == 0 else 0)
    m.add("peftnode_verify_last_run_timestamp_seconds", report.finished_at.timestamp())
    m.add("peftnode_verify_info", 1, {"stack": report.stack.get("name") or "", "version": checks.__version__})
    return m.render()


def write_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` atomically: a temp file in the same directory, fsync, os.replace."""
    target = Path(path)
    directory = target.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; node_exporter usually runs as another user and must read the file.
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return target


def write_prom(report: Report, path: str | os.PathLike) -> Path:
    """Write the metrics atomically to ``path`` (e.g. /var/lib/node_exporter/textfile/peftnode.prom)."""
    return write_atomic(path, render_prom(report))
