"""Reading a fleet run directory (what playbooks/verify.yml fetches) into a :class:`Run`.

Layout: ``run.json`` (run id, start, stack, every targeted host), ``<host>.json`` (the node's verify
report), ``<host>.noreport.json`` (why a node produced none), ``pairs/<a>--<b>.json`` (multi-node
all-reduce pairs). A host named in run.json with neither file is "no report: missing from the run
directory"; a report that cannot be read is "no report: unreadable ..." for that host, never a traceback.
Without run.json the hosts are the reports found. A directory that does not exist or holds nothing of
this is a usage error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from checks.registry import UsageError
from checks.stack import shown

RUN_SCHEMA = "peftnode.fleet.run/1"
NOREPORT_SCHEMA = "peftnode.fleet.noreport/1"
REPORT_SCHEMA = "peftnode.verify.report/1"
PAIR_SCHEMA = "peftnode.fleet.pair/1"
FLEET_REPORT_SCHEMA = "peftnode.fleet.report/1"  # checks.fleet.judge.FLEET_SCHEMA: fleet-report's own JSON
MAX_BYTES = 64 << 20  # a verify report is tens of kB; anything this big is not one


@dataclass
class NoReport:
    kind: str  # unreachable, timeout, crashed, failed, missing, unreadable
    reason: str
    rc: int | None = None
    stderr_tail: str = ""


@dataclass
class Run:
    directory: Path
    run_id: str | None
    started_at: str | None
    stack: str | None
    hosts: list[str]
    reports: dict[str, dict] = field(default_factory=dict)  # host -> verify JSON
    files: dict[str, str] = field(default_factory=dict)  # host -> report file name
    missing: dict[str, NoReport] = field(default_factory=dict)  # host -> why there is no report
    pairs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # unreadable run.json / pair files, said on the console


def _check_schema(data: dict, schema: str) -> dict:
    if data.get("schema") != schema:
        raise ValueError(f"schema is {str(data.get('schema'))[:60]!r}, not {schema}")
    return data


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming what is wrong with it."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES >> 20} MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(exc.strerror or type(exc).__name__) from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _valid_report(data: dict) -> dict:
    _check_schema(data, REPORT_SCHEMA)
    results = data.get("results")
    if not isinstance(results, list) or not all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("group"), str)
            and r.get("status") in ("pass", "skip", "warn", "error", "fail") for r in results):
        raise ValueError("its results are not a list of checks with name, group and status")
    return data


def _noreport(data: dict) -> NoReport:
    _check_schema(data, NOREPORT_SCHEMA)
    rc = data.get("rc")
    return NoReport(str(data.get("kind") or "failed"), str(data.get("reason") or "no reason given"),
                    rc if isinstance(rc, int) else None, str(data.get("stderr_tail") or ""))


def load_run(directory: str | Path) -> Run:
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(f"{shown(str(directory))} is not a directory (give the run directory verify.yml wrote, "
                         f"e.g. reports/<run-id>)")
    run_file = root / "run.json"
    meta: dict = {}
    notes: list[str] = []
    if run_file.exists():
        try:
            meta = _check_schema(_read_json(run_file), RUN_SCHEMA)
        except ValueError as exc:
            notes.append(f"run.json unreadable ({exc}): hosts taken from the report files")
            meta = {}
    try:
        names = sorted(p.name for p in root.iterdir() if p.is_file())
    except OSError as exc:
        raise UsageError(f"cannot read {shown(str(directory))}: {exc.strerror}") from None
    noreport_hosts = [n[: -len(".noreport.json")] for n in names if n.endswith(".noreport.json")]
    report_hosts = [n[: -len(".json")] for n in names
                    if n.endswith(".json") and n != "run.json" and not n.endswith(".noreport.json")]
    listed = meta.get("hosts") if isinstance(meta.get("hosts"), list) else None
    hosts = [str(h) for h in listed] if listed is not None else []
    found = [h for h in sorted(set(report_hosts) | set(noreport_hosts)) if h not in hosts]
    hosts += found
    run = Run(root, meta.get("run_id") if isinstance(meta.get("run_id"), str) else None,
              meta.get("started_at") if isinstance(meta.get("started_at"), str) else None,
              meta.get("stack") if isinstance(meta.get("stack"), str) else None, hosts, notes=notes)
    for host in list(hosts):
        report_file, noreport_file = root / f"{host}.json", root / f"{host}.noreport.json"
        if report_file.is_file():
            try:
                data = _read_json(report_file)
                if host in found and data.get("schema") == FLEET_REPORT_SCHEMA:
                    hosts.remove(host)  # fleet-report's own output (verify.yml writes fleet.json there): not a node
                    continue
                run.reports[host] = _valid_report(data)
                run.files[host] = report_file.name
            except ValueError as exc:
                run.missing[host] = NoReport("unreadable", f"unreadable {report_file.name}: {exc}")
            continue
        if noreport_file.is_file():
            try:
                run.missing[host] = _noreport(_read_json(noreport_file))
            except ValueError as exc:
                run.missing[host] = NoReport("unreadable", f"unreadable {noreport_file.name}: {exc}")
            continue
        run.missing[host] = NoReport("missing", "missing from the run directory")
    if not hosts:
        raise UsageError(f"{shown(str(directory))} holds no run.json and no <host>.json reports: nothing to report on")
    pair_dir = root / "pairs"
    if pair_dir.is_dir():
        for path in sorted(pair_dir.glob("*.json")):
            try:
                run.pairs.append(_check_schema(_read_json(path), PAIR_SCHEMA))
            except ValueError as exc:
                notes.append(f"pairs/{path.name} unreadable ({exc}): left out")
    return run
