"""One run's results and the renderers that turn them into console, JSON, JUnit, Prometheus and
Markdown output. Every renderer takes the same :class:`Report`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from checks.result import Result, Status, worst
from checks.runner import blocked_roots, is_blocked  # noqa: F401  (is_blocked: re-exported for the renderers)

REPORT_SCHEMA = "peftnode.verify.report/1"
EXIT_INTERRUPTED = 130


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
    def interrupted(self) -> bool:
        """Ctrl-C stopped the run: the results that finished are kept, the rest skip 'interrupted'."""
        return bool(self.options.get("interrupted"))

    @property
    def exit_code(self) -> int:
        """0 healthy (warnings allowed), 1 any fail or error, 130 interrupted (128 + SIGINT, as a shell
        reports it): an interrupted run proves nothing about the node, whatever finished before."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 0 if self.status.healthy else 1

    @property
    def verdict(self) -> str:
        """HEALTHY, UNHEALTHY or INTERRUPTED: the word every renderer shows beside the exit code."""
        if self.interrupted:
            return "INTERRUPTED"
        return "HEALTHY" if self.exit_code == 0 else "UNHEALTHY"

    def counts(self) -> dict[str, int]:
        out = {s.label: 0 for s in Status}
        for r in self.results:
            out[r.status.label] += 1
        return out

    def blocked_by(self) -> dict[str, int]:
        """How many checks each failed check blocked (skipped as "blocked by X"), by root cause."""
        return blocked_roots(self.results)

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


def _checks(n: int) -> str:
    return f"{n} check" if n == 1 else f"{n} checks"


def root_cause_line(blocked: dict[str, int]) -> str | None:
    """E.g. ``1 root cause (gpu.driver) blocked 14 checks`` or ``2 root causes (gpu.driver: 14,
    cuda.toolkit: 1) blocked 15 checks``; None when nothing was blocked."""
    if not blocked:
        return None
    total = sum(blocked.values())
    if len(blocked) == 1:
        (root,) = blocked
        return f"1 root cause ({root}) blocked {_checks(total)}"
    roots = ", ".join(f"{root}: {n}" for root, n in sorted(blocked.items(), key=lambda item: (-item[1], item[0])))
    return f"{len(blocked)} root causes ({roots}) blocked {_checks(total)}"


def counts_text(report: Report) -> str:
    """E.g. ``9 pass, 16 skip (14 blocked), 0 warn, 0 error, 1 fail``: blocked skips are counted
    apart from ordinary ones."""
    blocked = sum(report.blocked_by().values())
    parts = []
    for label, n in report.counts().items():
        extra = f" ({blocked} blocked)" if label == Status.SKIP.label and blocked else ""
        parts.append(f"{n} {label}{extra}")
    return ", ".join(parts)
