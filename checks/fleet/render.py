"""Rendering a fleet (the fleet JSON of :func:`checks.fleet.judge.build_fleet`): the console (rich), the
JSON file and JUnit XML (one testsuite per node, one testcase per check result, valid against the same
junit-10.xsd as verify's; a node without a report is one errored testcase)."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from checks.fleet.judge import METRIC_UNITS, NO_REPORT
from checks.result import Result, Status

STYLE = {"pass": "green", "skip": "dim", "warn": "yellow", "error": "red", "fail": "bold red", NO_REPORT: "bold red"}
CELL = {"pass": "ok", "skip": "skip", "warn": "WARN", "error": "ERR", "fail": "FAIL"}
NODE_WORD = {"pass": "pass", "warn": "warn", "error": "ERROR", "fail": "FAIL", NO_REPORT: "NO REPORT"}
WIDE = 110  # below this many columns the group headers are cut to 4 characters (a legend says which is which)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def abbreviations(groups: list[str], width: int) -> dict[str, str]:
    if width >= WIDE:
        return {g: g for g in groups}
    out: dict[str, str] = {}
    for g in groups:
        short, n = g[:4], 4
        while short in out.values() and n < len(g):
            n += 1
            short = g[:n]
        out[g] = short
    return out


def fleet_table(fleet: dict, width: int) -> tuple[Table, dict[str, str]]:
    short = abbreviations(fleet["groups"], width)
    flagged: dict[str, list[str]] = {}
    for o in fleet["outliers"]:
        if "slow" not in flagged.setdefault(o["host"], []):
            flagged[o["host"]].append("slow")
    for d in fleet["drift"]:
        if "drift" not in flagged.setdefault(d["host"], []):
            flagged[d["host"]].append("drift")
    table = Table(box=None, padding=(0, 1, 0, 0), show_edge=False, header_style="bold", pad_edge=False)
    table.add_column("node", overflow="fold", min_width=6)
    table.add_column("status", no_wrap=True)
    for g in fleet["groups"]:
        table.add_column(short[g], no_wrap=True)
    table.add_column("fleet", overflow="fold")
    for node in fleet["nodes"]:
        status = node["status"]
        cells = [Text(node["host"]), Text(NODE_WORD[status], style=STYLE[status])]
        for g in fleet["groups"]:
            got = node["groups"].get(g)
            cells.append(Text(CELL[got], style=STYLE[got]) if got else Text("-", style="dim"))
        cells.append(Text(",".join(flagged.get(node["host"], [])), style="yellow"))
        table.add_row(*cells)
    return table, short


def summary_line(fleet: dict) -> str:
    c = fleet["counts"]
    parts = ", ".join(f"{c[s]} {s}" for s in ("pass", "warn", "fail", "error", NO_REPORT))
    pairs = f"; {c['pairs_failed']} of {c['pairs']} pairs failing" if c.get("pairs") else ""
    return f"{c['nodes']} nodes: {parts}{pairs} -> {fleet['verdict']} (exit {fleet['exit_code']})"


def _nodes(n: int) -> str:
    return "1 node" if n == 1 else f"{n} nodes"


def render_fleet_console(fleet: dict, console: Console) -> None:
    out = console.print
    title = f"peftnode fleet report{' ' + fleet['run_id'] if fleet.get('run_id') else ''}"
    out(Text(title, style="bold"), Text(f"  {fleet['counts']['nodes']} nodes, {fleet['generated_at']}"))
    for note in fleet.get("notes") or []:
        out(Text(f"note: {note}", style="yellow"))
    table, short = fleet_table(fleet, console.width)
    out(table)
    legend = [f"{s}={g}" for g, s in short.items() if s != g]
    if legend:
        out(Text("groups: " + " ".join(legend), style="dim"))

    if fleet["causes"]:
        out(Text("\nFailures by cause", style="bold"))
        for cause in fleet["causes"]:
            head = Text(f"{_nodes(len(cause['hosts']))}: ", style="bold")
            head.append(cause["cause"], style=STYLE.get(cause["status"], "red"))
            out(head)
            out(Text(f"  {', '.join(cause['hosts'])}"))
            if len(cause["examples"]) == 1 and cause["examples"][0] not in (cause["cause"],
                                                                           cause["cause"].split(": ", 1)[-1]):
                out(Text(f"  e.g. {cause['examples'][0]}", style="dim"))
            if cause.get("remediation"):
                out(Text(f"  -> {cause['remediation']}", style="cyan"))

    if fleet["outliers"]:
        out(Text(f"\nOutliers (below {fleet['outlier_ratio']:g}x the fleet median of the same GPU model)",
                 style="bold"))
        for o in fleet["outliers"]:
            unit = METRIC_UNITS.get(o["metric"], "")
            where = f"{o['host']} gpu{o['gpu']}" if o["gpu"] is not None else o["host"]
            out(Text(f"{where}: {o['metric']} {_fmt(o['value'])} {unit} = {o['ratio']:.2f}x the median "
                     f"{_fmt(o['median'])} ({o['gpu_model']})"))

    if fleet["drift"]:
        against = f" or the stack {fleet['stack']}" if fleet.get("stack") else ""
        out(Text(f"\nDrift (versions off the fleet majority{against})", style="bold"))
        for d in fleet["drift"]:
            wants = []
            if d["majority"] is not None and d["majority"] != d["value"]:
                wants.append(f"majority {d['majority']}")
            if d["stack"] is not None:
                wants.append(f"stack {d['stack']}")
            out(Text(f"{d['host']}: {d['component']} {d['value']} ({'; '.join(wants) or 'no majority'})"))

    if fleet["pairs"]:
        out(Text("\nNode pairs (all-reduce between two nodes)", style="bold"))
        for p in fleet["pairs"]:
            bw = f"busbw {_fmt(p['busbw_gbps'])} GB/s" if isinstance(p.get("busbw_gbps"), (int, float)) else "no busbw"
            exp = (f" (expected {_fmt(p['expected_gbps'])})" if isinstance(p.get("expected_gbps"), (int, float))
                   else "")
            status = str(p.get("status", "error"))
            line = Text(f"{' + '.join(map(str, p.get('hosts', [])))}: ")
            line.append(status.upper(), style=STYLE.get(status, "red"))
            line.append(f" {bw}{exp}")
            if status != "pass" and p.get("message"):
                line.append(f": {p['message']}")
            out(line)

    suspects = fleet.get("pair_suspects") or []
    if suspects:
        names = ", ".join(f"{s['host']} ({s['failing_pairs']} failing pair{'s' if s['failing_pairs'] > 1 else ''})"
                          for s in suspects)
        out(Text(f"Likely link fault (NIC, cable, switch port) at: {names}", style="red"))

    verdict = Text("\n" + summary_line(fleet), style="bold red" if fleet["exit_code"] else "bold green")
    out(verdict)


def dumps_fleet(fleet: dict) -> str:
    return json.dumps(fleet, indent=2, ensure_ascii=False) + "\n"


def write_fleet_json(fleet: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(dumps_fleet(fleet), encoding="utf-8")


# --- JUnit ---------------------------------------------------------------------------------------------

def render_fleet_junit(fleet: dict, reports: dict[str, dict]) -> str:
    from checks.report.junit import _clean, _counts, _seconds, _testcase, check_name

    results_by_host = {host: [Result.from_dict(r) for r in report["results"]] for host, report in reports.items()}
    total = Counter()
    root = ET.Element("testsuites", name="peftnode fleet-report")
    for node in fleet["nodes"]:
        host = node["host"]
        results = results_by_host.get(host)
        if results is None:
            suite = ET.SubElement(root, "testsuite", name=_clean(host), tests="1", failures="0", errors="1",
                                  skipped="0", time="0.000", timestamp=fleet["generated_at"][:19],
                                  hostname=_clean(host))
            case = ET.SubElement(suite, "testcase", classname=_clean(f"peftnode.{host}"), name="report")
            ET.SubElement(case, "error", message=_clean(node["reason"] or NO_REPORT), type=NO_REPORT).text = _clean(
                node["reason"] or NO_REPORT)
            total.update(tests=1, errors=1)
            continue
        report = reports[host]
        counts = _counts(results)
        duration = report.get("duration_s")
        suite = ET.SubElement(root, "testsuite", name=_clean(host), **counts,
                              time=_seconds(duration if isinstance(duration, (int, float)) else 0.0),
                              timestamp=str(report.get("started_at", fleet["generated_at"]))[:19],
                              hostname=_clean((report.get("host") or {}).get("hostname") or host))
        properties = ET.SubElement(suite, "properties")
        for key, value in (("stack", (report.get("stack") or {}).get("name")), ("node_status", node["status"]),
                           ("report", node["report"])):
            if value is not None:
                ET.SubElement(properties, "property", name=key, value=_clean(value))
        parts = Counter((r.group, check_name(r)) for r in results)
        for result in results:
            _testcase(suite, result, parts[(result.group, check_name(result))])
            case = suite[-1]
            case.set("classname", _clean(f"peftnode.{host}.{result.group}"))
        total.update(tests=len(results), failures=sum(r.status == Status.FAIL for r in results),
                     errors=sum(r.status == Status.ERROR for r in results))
    root.set("tests", str(total["tests"]))
    root.set("failures", str(total["failures"]))
    root.set("errors", str(total["errors"]))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_fleet_junit(fleet: dict, reports: dict[str, dict], path: str | os.PathLike) -> None:
    Path(path).write_text(render_fleet_junit(fleet, reports), encoding="utf-8")
