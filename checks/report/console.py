"""Human-readable console output: a table grouped by check group, worst first, and a summary line."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from checks.report import Report, counts_text, root_cause_line
from checks.result import Result, Status, sort_worst_first, worst

STATUS_STYLE: dict[Status, str] = {
    Status.PASS: "green",
    Status.SKIP: "dim",
    Status.WARN: "yellow",
    Status.ERROR: "magenta",
    Status.FAIL: "bold red",
}

# Statuses whose rows carry the remediation hint under the message.
_HINTED = (Status.WARN, Status.ERROR, Status.FAIL)


def group_results(results: list[Result]) -> list[tuple[str, list[Result]]]:
    """Results by group: groups ordered by their worst status (worst first, then by name), each
    group's results worst first."""
    groups: dict[str, list[Result]] = {}
    for result in results:
        groups.setdefault(result.group, []).append(result)
    ordered = sorted(groups.items(), key=lambda item: (-int(worst(r.status for r in item[1])), item[0]))
    return [(name, sort_worst_first(members)) for name, members in ordered]


def format_measured(result: Result) -> str:
    """Measured values as compact ``key=value unit`` pairs."""
    return ", ".join(f"{key}={value}" for key, value in result.measured.items())


def format_duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2f} s"


def summary_line(report: Report) -> str:
    """E.g. ``14 checks: 9 pass, 2 skip, 1 warn, 0 error, 2 fail in 3.2 s -> UNHEALTHY (exit 1)``; when
    failed checks blocked others, the skip count says how many and a second sentence names the root
    causes: ``... 16 skip (14 blocked) ... (exit 1); 1 root cause (gpu.driver) blocked 14 checks``."""
    total = len(report.results)
    noun = "check" if total == 1 else "checks"
    verdict = "HEALTHY" if report.exit_code == 0 else "UNHEALTHY"
    line = (f"{total} {noun}: {counts_text(report)} in {format_duration(report.duration_s)} -> {verdict} "
            f"(exit {report.exit_code})")
    roots = root_cause_line(report.blocked_by())
    return f"{line}; {roots}" if roots else line


def header_line(report: Report) -> str:
    host = report.host.get("hostname") or "unknown host"
    stack = report.stack.get("name") or "unknown stack"
    started = report.started_at.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    return (
        f"{report.title} on {host} against stack {stack}, started {started}, took {format_duration(report.duration_s)}"
    )


def _status_cell(status: Status) -> Text:
    return Text(status.label.upper(), style=STATUS_STYLE[status])


def _message_cell(result: Result) -> Text:
    # Text objects (never markup strings): check names and messages may contain "[...]".
    text = Text(result.message)
    if result.remediation and result.status in _HINTED:
        text.append("\n")
        text.append(f"hint: {result.remediation}", style="dim")
    return text


def build_table(report: Report) -> Table:
    table = Table(show_header=True, header_style="bold", expand=False, show_lines=False)
    table.add_column("Group", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Check", no_wrap=True)
    table.add_column("Message", overflow="fold", ratio=3)
    table.add_column("Measured", overflow="fold", ratio=2)
    for group, members in group_results(report.results):
        for index, result in enumerate(members):
            table.add_row(
                Text(group, style="bold") if index == 0 else Text(""),
                _status_cell(result.status),
                Text(result.name),
                _message_cell(result),
                Text(format_measured(result)),
                end_section=index == len(members) - 1,
            )
    return table


def render_console(report: Report, console: Console, *, verbose: bool = False, failed_only: bool = False) -> None:
    """Print the header, the results table and the summary line to ``console``."""
    console.print(Text(header_line(report), style="bold"))
    if report.results:
        console.print(build_table(report))
    else:
        console.print(Text("no checks ran", style="dim"))
    style = "bold green" if report.exit_code == 0 else "bold red"
    if report.status == Status.WARN:
        style = "bold yellow"
    console.print(Text(summary_line(report), style=style))
