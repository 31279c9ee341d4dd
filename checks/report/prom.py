"""Prometheus textfile-collector output (for node_exporter's ``--collector.textfile.directory``).

The metrics are a snapshot of one run, so they are handed to ``prometheus_client`` as a collector
that yields gauge families from the report (not as live ``Gauge`` objects, which would turn into
per-process files if ``PROMETHEUS_MULTIPROC_DIR`` happened to be set), in a registry of their own.
``prometheus_client`` does the exposition format (escaping, NaN, HELP/TYPE) and the atomic write:
``write_to_textfile`` writes ``<path>.<pid>.<thread>`` beside the target and renames it over the
target, so node_exporter (which reads only ``*.prom``) never sees half a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily

import checks
from checks.report import Report
from checks.result import Result, Status

_HEALTHY_STATUSES = (Status.PASS, Status.SKIP, Status.WARN)
_CHECK_LABELS = ["check", "group"]
FILE_MODE = 0o644  # node_exporter usually runs as another user and must be able to read the file


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ReportCollector:
    """The families of one report; ``collect`` yields them fresh on every scrape or write."""

    def __init__(self, report: Report):
        self.report = report

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self.report
        status = GaugeMetricFamily(
            "peftnode_check_status",
            "Status of a peftnode check as a severity code: 0 pass, 1 skip, 2 warn, 3 error, 4 fail.",
            labels=_CHECK_LABELS,
        )
        ok = GaugeMetricFamily(
            "peftnode_check_ok",
            "1 if the check passed, was skipped or warned; 0 on fail or error.",
            labels=_CHECK_LABELS,
        )
        duration = GaugeMetricFamily(
            "peftnode_check_duration_seconds", "How long the check took to run, in seconds.", labels=_CHECK_LABELS
        )
        measurement = GaugeMetricFamily(
            "peftnode_check_measurement",
            "A numeric value a check measured; the name label says which, the unit label its unit (empty if none).",
            labels=[*_CHECK_LABELS, "name", "unit"],
        )
        # One series per label set (a repeated one makes node_exporter drop the whole file): where a
        # check name repeats, its worst result stands.
        by_labels: dict[tuple[str, str], Result] = {}
        for result in report.results:
            kept = by_labels.get((result.name, result.group))
            if kept is None or result.status > kept.status:
                by_labels[(result.name, result.group)] = result
        for (name, group), result in by_labels.items():
            labels = [name, group]
            status.add_metric(labels, int(result.status))
            ok.add_metric(labels, 1 if result.status in _HEALTHY_STATUSES else 0)
            duration.add_metric(labels, float(result.duration_s))
            for key, measured in result.measured.items():
                if _is_number(measured.value):
                    measurement.add_metric([*labels, key, measured.unit or ""], float(measured.value))
        yield from (status, ok, duration, measurement)

        healthy = GaugeMetricFamily(
            "peftnode_verify_healthy", "1 if the last peftnode verify run was healthy (no fail or error), else 0."
        )
        healthy.add_metric([], 1 if report.exit_code == 0 else 0)
        finished = GaugeMetricFamily(
            "peftnode_verify_last_run_timestamp_seconds", "Unix time at which the last peftnode verify run finished."
        )
        finished.add_metric([], report.finished_at.timestamp())
        info = GaugeMetricFamily(
            "peftnode_verify_info",
            "Stack and peftnode version of the last verify run; always 1.",
            labels=["stack", "version"],
        )
        info.add_metric([report.stack.get("name") or "", checks.__version__], 1)
        yield from (healthy, finished, info)


def registry_of(report: Report) -> CollectorRegistry:
    """A registry of its own holding the report's families (never the process-global default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(report))
    return registry


def render_prom(report: Report) -> str:
    """The report in Prometheus text exposition format (all gauges)."""
    return generate_latest(registry_of(report)).decode("utf-8")


def write_prom(report: Report, path: str | os.PathLike) -> Path:
    """Write the metrics atomically to ``path`` (e.g. /var/lib/node_exporter/textfile/peftnode.prom),
    readable by every user (``write_to_textfile`` leaves the mode to the umask)."""
    target = Path(path)
    write_to_textfile(str(target), registry_of(report))
    os.chmod(target, FILE_MODE)
    return target
