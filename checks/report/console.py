"""Human-readable console output, sized to the terminal.

What a person reads, in order:

- a header (command, host, stack, start, duration) that fits 80 columns;
- every problem, worst first (fail, then error, then warn; a failure that blocked other checks leads its
  status), as ``STATUS  check  message  → remediation`` on one line when it fits; otherwise the message,
  cut to the width with an ellipsis, keeps the line and ``→ remediation`` (cut the same way) gets an
  indented second line. With more than 20 problems each stays on one line while the remediation can keep
  a quarter of the width beside the message (cut there). A check's name is never cut;
- passes and skips counted per group (``gpu: 1 pass, 9 skip (8 blocked by gpu.driver), 1 fail``), or with
  ``verbose`` every result one line each under its group;
- the summary line (:func:`summary_line`), wrapped between its parts rather than inside them.

``failed_only`` keeps the problems and the summary. Everything is built from :class:`rich.text.Text`
(never markup strings: check names hold ``[...]``); rich drops the colours when the output is not a
terminal. The full messages are in the JSON report.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from checks.report import Report, counts_text, root_cause_line
from checks.result import Result, Status, sort_worst_first, worst
from checks.runner import blocked_roots

STATUS_STYLE: dict[Status, str] = {
    Status.PASS: "green",
    Status.SKIP: "dim",
    Status.WARN: "yellow",
    Status.ERROR: "magenta",
    Status.FAIL: "bold red",
}
REMEDIATION_STYLE = "cyan"

# Statuses listed one line each (with their remediation) before the per-group counts.
PROBLEMS = (Status.FAIL, Status.ERROR, Status.WARN)

STATUS_WIDTH = max(len(s.label) for s in Status)  # "error"
GAP = "  "
INDENT = STATUS_WIDTH + 1  # where a check's name starts ("ERROR name", "FAIL  name"); a problem's second line too
MIN_MESSAGE = 16  # fewer columns than this beside a name: the message moves to a line of its own
MIN_REMEDY = 24  # compact: a remediation cut shorter than this (or a quarter of the width) gets a second line
COMPACT_AFTER = 20  # more problems than this (two lines each would overflow a 50-row terminal): compact lines


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


def summary_parts(report: Report) -> list[str]:
    """The summary line in the pieces a narrow terminal may break it between (never inside one)."""
    total = len(report.results)
    noun = "check" if total == 1 else "checks"
    roots = root_cause_line(report.blocked_by())
    parts = [f"{total} {noun}: {counts_text(report)}", f"in {format_duration(report.duration_s)}",
             f"-> {report.verdict} (exit {report.exit_code}){';' if roots else ''}"]
    return parts + [roots] if roots else parts


def summary_line(report: Report) -> str:
    """E.g. ``14 checks: 9 pass, 2 skip, 1 warn, 0 error, 2 fail in 3.2 s -> UNHEALTHY (exit 1)``; when
    failed checks blocked others, the skip count says how many and a second sentence names the root
    causes: ``... 16 skip (14 blocked) ... (exit 1); 1 root cause (gpu.driver) blocked 14 checks``."""
    return " ".join(summary_parts(report))


def header_line(report: Report, host: str | None = None) -> str:
    """``peftnode verify on gpu01, stack cu117, 2026-12-02 12:11:27 UTC, 0.32 s``: 70-odd columns for a
    short host name; :func:`render_console` passes a long one shortened to fit the width."""
    host = host or report.host.get("hostname") or "unknown host"
    stack = report.stack.get("name") or "unknown stack"
    started = report.started_at.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    return f"{report.title} on {host}, stack {stack}, {started}, {format_duration(report.duration_s)}"


class _Layout:
    """Width-dependent pieces: the console's width and the characters its encoding can show."""

    def __init__(self, console: Console):
        self.width = max(console.width, 1)
        unicode = (console.encoding or "").lower().startswith("utf")
        self.arrow = "→" if unicode else "->"
        self.ellipsis = "…" if unicode else "..."

    def fit(self, text: Text, width: int) -> Text:
        """``text`` cut to ``width`` cells, ending in an ellipsis when cut."""
        if text.cell_len <= width:
            return text
        keep = max(width - cell_len(self.ellipsis), 0)
        out = text.copy()
        out.truncate(keep, overflow="crop")
        out.rstrip()
        out.append(self.ellipsis[: max(width, 0)])
        return out


def _one_line(text: str | None) -> str:
    """A message or remediation on one line: newlines and runs of blanks become single spaces."""
    return " ".join((text or "").split())


def _status(status: Status) -> Text:
    """The status word styled, then blanks up to where the name starts."""
    return Text.assemble((status.label.upper(), STATUS_STYLE[status]), " " * (INDENT - len(status.label)))


def _name_width(names: list[str], width: int) -> int:
    """The name column: as wide as the longest name, up to 35 % of the width (28 of 80 columns); a longer
    name pushes its own message right instead of being cut."""
    return min(max((cell_len(n) for n in names), default=0), max(12, width * 7 // 20))


def _problem_lines(result: Result, layout: _Layout, name_width: int, compact: bool) -> list[tuple[Text, str]]:
    """One problem as one or two lines (three only when the name alone nearly fills the width):
    ``(text, overflow)`` pairs for ``console.print``. ``compact`` (many problems): a remediation that does
    not fit beside the message is cut there rather than given its own line, while that leaves it a quarter
    of the width."""
    width = layout.width
    head = _status(result.status) + Text(result.name, style="bold")
    head.pad_right(max(name_width - cell_len(result.name), 0))
    message = Text(_one_line(result.message))
    remedy = _one_line(result.remediation)
    arrow = Text(f"{layout.arrow} {remedy}", style=REMEDIATION_STYLE) if remedy else None
    room = width - head.cell_len - len(GAP)
    if room < MIN_MESSAGE:  # a very long name (or a very narrow terminal): the name gets the line to itself
        lines = [(_status(result.status) + Text(result.name, style="bold"), "fold"),
                 (Text(" " * INDENT) + layout.fit(message, width - INDENT), "ellipsis")]
        if arrow:
            lines.append((Text(" " * INDENT) + layout.fit(arrow, width - INDENT), "ellipsis"))
        return lines
    if arrow is None:
        return [(head + GAP + layout.fit(message, room), "ellipsis")]
    left = room - message.cell_len - len(GAP)  # what the whole message leaves for the remediation
    if left >= arrow.cell_len or (compact and left >= max(MIN_REMEDY, width // 4)):
        return [(head + GAP + message + GAP + layout.fit(arrow, left), "ellipsis")]
    # a long message: as much of it as fits, and the remediation on a line of its own
    return [(head + GAP + layout.fit(message, room), "ellipsis"),
            (Text(" " * INDENT) + layout.fit(arrow, width - INDENT), "ellipsis")]


def _group_counts(members: list[Result]) -> str:
    """E.g. ``1 pass, 9 skip (8 blocked by gpu.driver), 1 fail``: the statuses present, mildest first."""
    parts = []
    for status in Status:
        n = sum(1 for r in members if r.status == status)
        if not n:
            continue
        text = f"{n} {status.label}"
        if status == Status.SKIP:
            roots = blocked_roots(members)
            if len(roots) == 1:
                ((root, count),) = roots.items()
                text += f" ({count} blocked by {root})"
            elif roots:
                listed = ", ".join(f"{root} {count}" for root, count in
                                   sorted(roots.items(), key=lambda item: (-item[1], item[0])))
                text += f" ({sum(roots.values())} blocked: {listed})"
        parts.append(text)
    return ", ".join(parts)


def _groups(results: list[Result]) -> list[tuple[str, list[Result]]]:
    """Results by group, groups in the order the checks ran (the registry's order)."""
    groups: dict[str, list[Result]] = {}
    for result in results:
        groups.setdefault(result.group, []).append(result)
    return list(groups.items())


def problems(report: Report) -> list[Result]:
    """The results a person must act on: fails, then errors, then warnings; within a status, the checks
    that blocked the most others first, then the run's order."""
    blocked = report.blocked_by()
    chosen = [(i, r) for i, r in enumerate(report.results) if r.status in PROBLEMS]
    chosen.sort(key=lambda item: (-int(item[1].status), -blocked.get(item[1].name, 0), item[0]))
    return [r for _, r in chosen]


def _summary_lines(report: Report, width: int) -> list[Text]:
    """The summary's parts packed greedily into lines of ``width``; a part wider than that gets a line of
    its own (rich folds it at spaces)."""
    lines: list[str] = []
    for part in summary_parts(report):
        if lines and cell_len(lines[-1]) + 1 + cell_len(part) <= width:
            lines[-1] += " " + part
        else:
            lines.append(part)
    style = "bold green" if report.exit_code == 0 else "bold red"
    if report.status == Status.WARN or report.interrupted:
        style = "bold yellow"
    return [Text(line, style=style) for line in lines]


def render_console(report: Report, console: Console, *, verbose: bool = False, failed_only: bool = False) -> None:
    """Print the report to ``console`` at its width: header, problems, per-group counts (or, ``verbose``,
    every result), summary. ``failed_only``: the problems and the summary."""
    layout = _Layout(console)
    width = layout.width

    def emit(text: Text, overflow: str = "ellipsis") -> None:
        console.print(text, no_wrap=overflow != "fold", overflow=overflow, crop=overflow != "fold")

    if not failed_only:
        host = report.host.get("hostname") or "unknown host"
        spare = width - cell_len(header_line(report, host))
        if spare < 0:  # a long host name gives way first, then the line's end
            host = layout.fit(Text(host), max(cell_len(host) + spare, 8)).plain
        emit(layout.fit(Text(header_line(report, host), style="bold"), width))
    if not report.results:
        emit(Text("no checks ran", style="dim"))

    listed = problems(report)
    name_width = _name_width([r.name for r in listed], width)
    compact = len(listed) > COMPACT_AFTER
    for result in listed:
        for text, overflow in _problem_lines(result, layout, name_width, compact):
            emit(text, overflow)

    groups = _groups(report.results)
    if not failed_only and groups:
        if listed:
            console.print()
        label_width = max(cell_len(g) for g, _ in groups) + 1  # "group:"
        all_names = _name_width([r.name for r in report.results], width - 2)
        for group, members in groups:
            line = Text.assemble((f"{group}:".ljust(label_width), "bold"), GAP, _group_counts(members))
            emit(layout.fit(line, width))
            if verbose:
                for result in members:
                    emit(*_verbose_line(result, layout, all_names))
    for line in _summary_lines(report, width):
        console.print(line, overflow="fold")


def _verbose_line(result: Result, layout: _Layout, name_width: int) -> tuple[Text, str]:
    """``  STATUS  check  message  (measured)`` on one line, cut to the width (a long name keeps its
    full length and the rest gives way)."""
    line = Text("  ") + _status(result.status) + Text(result.name)
    line.pad_right(max(name_width - cell_len(result.name), 0))
    line += Text(GAP) + Text(_one_line(result.message))
    measured = format_measured(result)
    if measured:
        line += Text(f"  ({measured})", style="dim")
    if line.cell_len <= layout.width:
        return line, "ellipsis"
    name_end = 2 + INDENT + max(name_width, cell_len(result.name))
    if name_end + len(GAP) + MIN_MESSAGE > layout.width:  # no room beside the name: the name alone, folded
        alone = line[:name_end]
        alone.rstrip()
        return alone, "fold"
    return layout.fit(line, layout.width), "ellipsis"
