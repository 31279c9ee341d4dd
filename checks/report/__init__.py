"""One run's results and the renderers that turn them into console, JSON, JUnit, Prometheus and
Markdown output. Every renderer takes the same :class:`Report`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from checks.result import Result, Status, worst

REPORT_SCHEMA = "peftnode.verify.report/1"


@dataclass
class Report:
    results: list[Result]
    host: dict  # hostname, os, kernel, arch, python
    stack: dict  # name, source, description
    started_at: datetime  # timezone-aware UTC
    finished_at: datetime
    options: dict = field(default_factory=dict)  # only, skip, quick, timeout as given
    title: str = "peftnode verify"  # which command made the report (console, JUnit, Markdown headings)

    @property
    def status(self) -> Status:
        return worst(r.status for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 healthy (warnings allowed), 1 any fail or error."""
        return 0 if self.status.healthy else 1

    def counts(self) -> dict[str, int]:
        out = {s.label: 0 for s in Status}
        for r in self.results:
            out[r.status.label] += 1
        return out

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()
