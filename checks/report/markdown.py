"""Markdown summary, e.g. for a GitHub Actions job summary ($GITHUB_STEP_SUMMARY)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from checks.report import Report, counts_text, is_blocked, root_cause_line
from checks.report.console import format_duration, group_results
from checks.result import Result, Status, sort_worst_first

log = logging.getLogger(__name__)

_ICON = {
    Status.PASS: "✅",
    Status.SKIP: "⏭️",
    Status.WARN: "⚠️",
    Status.ERROR: "💥",
    Status.FAIL: "❌",
}


def escape_cell(text: object) -> str:
    """Make text safe inside a Markdown table cell: HTML-escape, escape pipes, newlines to <br>."""
    out = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    out = out.replace("\\", "\\\\").replace("|", "\\|")
    out = out.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")
    return out


def _status(status: Status) -> str:
    return f"{_ICON[status]} {status.label}"


def _values(result: Result) -> str:
    return ", ".join(f"{k}={v}" for k, v in result.measured.items())


def _table(results: list[Result], with_remediation: bool) -> list[str]:
    head = ["Status", "Group", "Check", "Message", "Measured"]
    if with_remediation:
        head.append("Remediation")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [_status(r.status), r.group, r.name, r.message, _values(r)]
        if with_remediation:
            cells.append(r.remediation or "")
        lines.append("| " + " | ".join(escape_cell(c) for c in cells) + " |")
    return lines


def render_markdown(report: Report) -> str:
    """Heading with the overall status, a counts line, problems first, then every result folded away."""
    healthy = report.exit_code == 0
    verdict = report.verdict
    icon = _ICON[Status.WARN] if healthy and report.status == Status.WARN else ("✅" if healthy else "❌")
    host = report.host.get("hostname") or "unknown host"
    stack = report.stack.get("name") or "unknown stack"
    blocked = report.blocked_by()
    lines = [
        f"## {icon} {report.title}: {verdict} (exit {report.exit_code})",
        "",
        f"Host `{escape_cell(host)}`, stack `{escape_cell(stack)}`, {format_duration(report.duration_s)}.",
        "",
        f"**{len(report.results)} checks:** {counts_text(report)}",
        "",
    ]
    if blocked:
        fixed = "it is" if len(blocked) == 1 else "they are"
        lines += [f"**{escape_cell(root_cause_line(blocked))}.** The blocked checks run again once {fixed} "
                  "fixed; they are in the full table below.", ""]
    # A blocked check needs no attention of its own: its root cause is in the table.
    problems = [r for r in sort_worst_first(report.results) if r.status != Status.PASS and not is_blocked(r)]
    if problems:
        lines += ["### Needs attention", "", *_table(problems, with_remediation=True), ""]
    elif report.results:
        lines += ["All checks passed.", ""]
    else:
        lines += ["No checks ran.", ""]
    if report.results:
        ordered = [r for _, members in group_results(report.results) for r in members]
        lines += [
            "<details>",
            f"<summary>All {len(report.results)} results</summary>",
            "",
            *_table(ordered, with_remediation=False),
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def append_step_summary(report: Report, env: Mapping[str, str] = os.environ) -> bool:
    """Append the Markdown summary to the file named by $GITHUB_STEP_SUMMARY; False when unset or
    the file cannot be written."""
    path = env.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(render_markdown(report) + "\n")
    except OSError as exc:
        log.warning("could not append to GITHUB_STEP_SUMMARY %s: %s", path, exc)
        return False
    return True
