"""NVIDIA DCGM's own diagnostic (``dcgmi diag``), when the node has DCGM: one verdict per DCGM test, and
one per GPU for a GPU that fails or warns.

Levels (``--dcgm-level``, ``ctx.options["dcgm_level"]``): 1 (software and deployment checks, seconds;
the default with ``--quick``), 2 (adds GPU memory and PCIe tests, ~2 minutes; the default), 3 (stress,
~15 minutes) and 4 (extended hardware tests, longer still): 3 and 4 are for a burn-in, not a verify.

**JSON first.** The check runs ``dcgmi diag -r N -j`` and reads its JSON, whose shape changed between
DCGM 3 and 4 (``../shared/FACTS.md`` "More facts", from DCGM's ``dcgmi/Diag.cpp``):

* 3.x: root key ``DCGM GPU Diagnostic``; ``test_categories[]{category, tests[]{name, results[]}}``; a
  result names its GPU by ``gpu_ids`` (3.0-3.2, a string) or ``gpu_id`` (3.3, a string, an integer in
  the Deployment category); its messages are ``warnings``: one string (3.0-3.2) or a list of
  ``{warning, error_id, error_category, error_severity}`` (3.3; in Deployment the text key is
  ``warnings``); ``version``, ``Driver Version Detected`` and ``GPU Device Serials{index: serial}``.
* 4.x: root key ``DCGM Diagnostic``; the same categories, a result names its entity by
  ``entity_group`` ("GPU") and ``entity_id``; ``tests[].test_summary{status, warnings}``; ``info`` is a
  list; ``metadata{version, Driver Version Detected}``; ``entity_groups[]{entities[]{entity_id,
  serial_num}}``.
* Either: a diagnostic that stopped prints only ``{root: {version, runtime_error}}``. Statuses are
  ``Pass``/``Fail``/``Skip`` (a warning prints as ``Fail`` in JSON); a test that did not run is left out.

**The text table is the fallback**, read only when ``-j`` printed no JSON (a DCGM without it): the table
is boxed (``+---`` / ``+===`` rules, section rules ``+-----  Hardware  ---+`` or ``|-----  Metadata
---|``, rows ``| name | value |``). A long value wraps onto the next rows with an empty name cell, cut
every W characters even inside a word, where W is the value column's width taken from the table's frame
less its padding (45 on every DCGM so far): never from a row, since a row may overflow its cell (an
8-GPU "GPU Device IDs Detected" row does). A result is ``Pass``, ``Fail``, ``Warn``, ``Skip`` or ``Not
Run`` with the GPUs it applies to (DCGM 3: ``Fail - All``, ``Pass - GPUs: 1, 2``, ``Fail - GPU: 0``;
DCGM 4: ``Pass`` then ``GPU0: Pass`` rows, a GPU's messages in ``Warning: GPU0`` rows between them).
``Warning`` / ``Info`` / ``Error`` rows after a test carry its details; an ``Error`` row with no test
before it (``Deployment``: DCGM stopped before running any test) is an error of the run.

Neither parser raises on any text, and neither turns what it cannot read into a pass: output with no
results, a table cut short, a JSON document of the wrong shape, an unknown status, or a failing result
the parser could not place each give a ``fail``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field

from checks.gpu.commands import run_command
from checks.registry import Context, check
from checks.result import GpuId, Status, Value, Verdict

QUICK_LEVEL = 1
FULL_LEVEL = 2
LEVELS = (1, 2, 3, 4)
# dcgmi's own deadline per level: DCGM's documented durations (1: seconds, 2: ~2 min, 3: ~15 min, 4: longer)
# with room to spare; level 4 has no documented figure, 3 h is this project's allowance.
TIMEOUT_S = {1: 120.0, 2: 270.0, 3: 1800.0, 4: 10800.0}
CHECK_TIMEOUT_S = max(TIMEOUT_S.values()) + 60.0  # the runner's last resort; dcgmi's own deadline comes first
MIN_RERUN_S = 10.0  # the text rerun (when -j printed no JSON) needs at least this much of the level's deadline

RESULTS = ("Pass", "Fail", "Warn", "Skip", "Not Run")
SEVERITY = {"Not Run": 0, "Skip": 1, "Pass": 2, "Warn": 3, "Fail": 4}
BAD = ("Fail", "Warn")
DETAIL_KINDS = ("warning", "info", "error")
JSON_ROOTS = ("DCGM GPU Diagnostic", "DCGM Diagnostic")  # 3.x, 4.x
WRAP_DEFAULT = 45  # DCGM's DATA_INFO_TAG_LEN, used only when the output has no frame to measure

SECTION_RX = re.compile(r"^[+|]-{2,}\s+(\S.*?)\s+-{2,}\+(-+)[+|]\s*$")
FRAME_RX = re.compile(r"^\+([-=]+)\+([-=]+)\+\s*$")
RESULT_RX = re.compile(
    r"(?:GPU\s*(?P<gpu>\d{1,6})\s*:\s*)?(?P<result>Pass|Fail|Warn|Skip|Not Run)\b"
    r"(?:\s*-\s*(?P<gpus>All\b|GPUs?\s*:?\s*\d+(?:\s*[,-]\s*\d+)*))?",
    re.IGNORECASE)
# A DCGM 4 per-entity row ("GPU3: Pass"); one after a Warning row belongs to the test, not to the warning.
ENTITY_ROW_RX = re.compile(r"(?P<group>[A-Za-z]+)\s*(?P<id>\d+)\s*:\s*(?P<result>Pass|Fail|Warn|Skip|Not Run)",
                           re.IGNORECASE)
# A whole cell that is a result (what a lost failing row looks like), as opposed to text that mentions one.
RESULT_CELL_RX = re.compile(
    r"(?:[A-Za-z]+\s*\d+\s*:\s*)?(Pass|Fail|Warn|Skip|Not Run)(?:\s*-\s*(?:All|GPUs?\s*:?\s*[\d,\s-]+))?",
    re.IGNORECASE)
GPU_RX = re.compile(r"\bGPU\s*(\d{1,3})\b")
DETAIL_GPU_RX = re.compile(r"GPU\s*(\d{1,6})\s*:?\s+(.*)", re.S)
MAX_ID = 10**6  # GPU and entity ids above this are not ids (and Python will not print an int of 4300+ digits)


@dataclass
class DiagTest:
    name: str
    section: str | None
    result: str  # the worst result over its GPUs: Fail > Warn > Pass > Skip > Not Run
    gpus: dict[str, str] = field(default_factory=dict)  # result -> "All" or "0, 1, 2"
    details: list[tuple[str, str]] = field(default_factory=list)  # ("Warning", "GPU 0 ..."): "GPU n" names its GPU
    per_gpu: dict[int, str] = field(default_factory=dict)  # GPU index -> its result, where DCGM names the GPU
    codes: list[tuple[int | None, int | None, int | None]] = field(default_factory=list)  # (gpu, error_id, severity)


@dataclass
class DiagReport:
    metadata: dict[str, str] = field(default_factory=dict)
    tests: list[DiagTest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # errors of the run: "Deployment: GPU 3 ...", "Error: ..."
    notes: list[str] = field(default_factory=list)  # Warning rows outside a test
    other: list[str] = field(default_factory=list)  # lines outside the table that are neither errors nor banners
    serials: dict[int, str] = field(default_factory=dict)  # GPU index -> board serial, where DCGM reports it
    source: str = "text"  # "json" or "text"


# --- shared helpers -------------------------------------------------------------------------------------


def _canonical(result: str) -> str:
    return next(r for r in RESULTS if r.lower() == " ".join(result.split()).lower())


def _worse(a: str | None, b: str) -> str:
    return b if a is None or SEVERITY[b] > SEVERITY[a] else a


def _indices(listed: str) -> list[int]:
    """``"1, 2, 5-7"`` -> [1, 2, 5, 6, 7]; ``"All"`` -> [] (DCGM did not say which)."""
    out: list[int] = []
    for part in re.findall(r"\d{1,6}\s*-\s*\d{1,6}|\d{1,6}", listed):
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-"))
            out.extend(range(lo, min(hi, lo + 256) + 1))
        else:
            out.append(int(part))
    return out


def _detail_gpu(text: str) -> int | None:
    m = DETAIL_GPU_RX.match(text)
    return int(m.group(1)) if m else None


def _gpu_texts(gpus: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in gpus.items() if v}


def _finish(test: DiagTest) -> DiagTest:
    """``gpus`` (result -> listed GPUs) from ``per_gpu`` where the GPUs are known."""
    for index, result in sorted(test.per_gpu.items()):
        listed = test.gpus.get(result)
        if listed != "All":
            test.gpus[result] = f"{listed}, {index}" if listed else str(index)
    return test


# --- the text table ---------------------------------------------------------------------------------------


def _cells(line: str) -> tuple[str, str] | None:
    parts = line.split("|")
    if len(parts) < 4 or parts[0].strip():
        return None
    return parts[1], "|".join(parts[2:-1])


def parse_results(text: str) -> tuple[str, dict[str, str]] | None:
    """``Fail - GPU: 0`` / ``Pass - GPUs: 1, 2`` / ``Pass`` + ``GPU0: Pass`` ... -> (worst result, result -> GPUs);
    None when the text does not start with a result."""
    parsed = _parse_results(text)
    return None if parsed is None else (parsed[0], parsed[1])


def _parse_results(text: str) -> tuple[str, dict[str, str], dict[int, str]] | None:
    text = " ".join(text.split())
    if not RESULT_RX.match(text):
        return None
    gpus: dict[str, list[str]] = {}
    per_gpu: dict[int, str] = {}
    worst = None
    found = list(RESULT_RX.finditer(text))
    # DCGM 4 prints a warning as "Warn" on the test's own row but as "Fail" on its GPU rows: read those as Warn.
    warn_only = _canonical(found[0].group("result")) == "Warn" and found[0].group("gpu") is None
    for m in found:
        result = _canonical(m.group("result"))
        if warn_only and result == "Fail" and m.group("gpu") is not None:
            result = "Warn"
        worst = _worse(worst, result)
        if m.group("gpu") is not None:
            gpus.setdefault(result, []).append(m.group("gpu"))
            per_gpu[int(m.group("gpu"))] = _worse(per_gpu.get(int(m.group("gpu"))), result)
        elif m.group("gpus"):
            listed = m.group("gpus")
            if listed.lower() == "all":
                gpus.setdefault(result, []).append("All")
            else:
                gpus.setdefault(result, []).append(re.sub(r"^GPUs?\s*:?\s*", "", listed, flags=re.I))
                for index in _indices(listed):
                    per_gpu[index] = _worse(per_gpu.get(index), result)
    return worst, {k: ", ".join(v) for k, v in gpus.items()}, per_gpu


def _wrap_width(lines: list[str], values: list[str]) -> int:
    """The value column's text width W, from the frame (``+----+----+`` rules, section rules): the cell is
    a space, W characters of text, a space of padding and its border. Without a frame (output cut short
    before it), the most common value-cell width; else DCGM's 45."""
    for line in lines:
        m = FRAME_RX.match(line) or SECTION_RX.match(line)
        if m:
            return max(len(m.group(2)) - 3, 1)
    if values:
        common = Counter(len(v) for v in values).most_common(1)[0][0]
        if common > 3:
            return common - 3
    return WRAP_DEFAULT


def _kind(name: str) -> str:
    return name.split(":")[0].strip().lower()


def parse_dcgmi_diag(text: str) -> DiagReport:
    """Parse ``dcgmi diag`` console output (the boxed table) into metadata, tests (with results per GPU and
    details) and errors."""
    report = DiagReport(source="text")
    rows: list[tuple[str | None, str, str]] = []  # (section, name cell, raw value cell)
    section: str | None = None
    table_lines: list[str] = []
    closed = False  # the table ended with its closing rule after a row
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith(("+", "|")):
            table_lines.append(stripped)
            m = SECTION_RX.match(stripped)
            if m:
                section = m.group(1).strip()
                closed = False
                continue
            if FRAME_RX.match(stripped):
                closed = bool(rows)
                continue
            cells = _cells(stripped)
            if cells:
                rows.append((section, cells[0], cells[1]))
                closed = False
        elif re.match(r"(Error\b|.*\bError:)", stripped):
            report.errors.append(stripped)
        elif stripped and not stripped.startswith(("Successfully ran diagnostic", "Successfully started")):
            report.other.append(stripped)
    if not rows:
        return report
    if not closed:
        report.errors.append("dcgmi's results table is cut short (no closing rule after its last row): the output "
                             "is incomplete")
    width = _wrap_width(table_lines, [v for _, _, v in rows])
    # Entries: [section, name, [raw value pieces]]. A wrapped value is cut at a fixed width W: non-final pieces
    # are exactly W characters (after the one space of padding), so they are joined without trimming.
    entries: list[list] = []
    for sec, name, value in rows:
        if name.strip():
            entries.append([sec, name.strip(), [value]])
            continue
        if ENTITY_ROW_RX.fullmatch(value.strip()) and entries and _kind(entries[-1][1]) in DETAIL_KINDS:
            owner = next((e for e in reversed(entries) if _kind(e[1]) not in DETAIL_KINDS and e[0] == sec), None)
            if owner is not None:  # a DCGM 4 "GPUn: Pass" row after a Warning row: the test's, not the warning's
                owner[2].append(value)
                continue
        if entries:
            entries[-1][2].append(value)
        elif RESULT_CELL_RX.fullmatch(value.strip()):
            report.errors.append(f"dcgmi printed a result row outside any test: {value.strip()!r}")
    last_test: DiagTest | None = None
    for sec, name, pieces in entries:
        joined = "".join(p[1:1 + width].ljust(width) for p in pieces[:-1]) + pieces[-1][1:]
        value = " ".join(joined.split())
        if name == "Diagnostic" and value == "Result":
            continue
        kind = _kind(name)
        if kind in DETAIL_KINDS:
            label = name.split(":")[0].strip().capitalize()
            extra = name.split(":", 1)[1].strip() if ":" in name else ""
            detail = f"{extra} {value}".strip() if extra else value
            if last_test is not None and last_test.section == sec:
                last_test.details.append((label, detail))
                if kind == "error":
                    last_test.result = "Fail"
                    index = _detail_gpu(detail)
                    if index is not None:
                        last_test.per_gpu[index] = "Fail"
            elif kind == "error":
                report.errors.append(f"{sec + ': ' if sec else ''}{detail}")
            elif kind == "warning":
                report.notes.append(f"{sec + ': ' if sec else ''}{detail}")
            continue
        parsed = _parse_results(value) if (sec or "").lower() != "metadata" else None
        if parsed is None:
            report.metadata[name] = value
            continue
        last_test = DiagTest(name, sec, parsed[0], parsed[1], per_gpu=parsed[2])
        report.tests.append(last_test)
    _guard_unplaced(report, [v.strip() for _, _, v in rows if RESULT_CELL_RX.fullmatch(v.strip())])
    return report


def _guard_unplaced(report: DiagReport, raw_results: list[str]) -> None:
    """A failing or warning result in the output that no parsed test carries (a row in the wrong place,
    a mangled document) is an error, never a silent pass."""
    placed = {t.result for t in report.tests} | {r for t in report.tests for r in t.per_gpu.values()}
    if report.errors:
        placed.add("Fail")
    seen = {_canonical(m.group(1)) for r in raw_results if (m := re.search(r"(?i)\b(Fail|Warn)\b", r))}
    if "Fail" in seen and "Fail" not in placed:
        report.errors.append("dcgmi's output has a failing result that no test carries (the output is garbled)")
    elif "Warn" in seen and not placed & {"Fail", "Warn"}:
        report.errors.append("dcgmi's output has a warning result that no test carries (the output is garbled)")


# --- the JSON document --------------------------------------------------------------------------------------


class _Shape(Exception):
    """The document is JSON but not DCGM's shape at ``where``."""


def _find_json(text: str) -> dict | None:
    """DCGM's JSON document in ``text`` (dcgmi may print a line before it): the first object starting a
    line that has one of DCGM's root keys, else the first object when it is the outermost one (JSON, but
    not DCGM's); None when there is none (a document cut short holds only inner objects: not JSON)."""
    decoder = json.JSONDecoder()
    first: dict | None = None
    for n, m in enumerate(re.finditer(r"(?m)^[ \t]*\{", text)):
        if n >= 20:
            break
        try:
            doc, _ = decoder.raw_decode(text, m.end() - 1)
        except (ValueError, RecursionError):
            continue
        if isinstance(doc, dict) and any(k in doc for k in JSON_ROOTS):
            return doc
        if n == 0 and isinstance(doc, dict):
            first = doc
    return first


def _list(value, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Shape(f"{where} is {type(value).__name__}, not a list")
    return value


def _dict(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Shape(f"{where} is {type(value).__name__}, not an object")
    return value


def _label(value) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return json.dumps(value)[:80]
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def _status(value) -> tuple[str, str | None]:
    """(result, a note when DCGM's status was not one we know: then the result is Fail)."""
    if isinstance(value, str) and " ".join(value.split()).lower() in {r.lower() for r in RESULTS}:
        return _canonical(value), None
    if isinstance(value, str) and value.strip().lower() in ("notrun", "not_run"):
        return "Not Run", None
    return "Fail", f"DCGM reported the status {_label(value)[:40]!r}, which is none of {', '.join(RESULTS)}"


def _messages(value, where: str) -> list[tuple[str, int | None, int | None]]:
    """DCGM's messages: one string (3.0-3.2), a list of strings (4.x info), or a list of
    ``{warning|warnings, error_id, error_severity}`` (3.3, 4.x) -> [(text, error_id, severity)]."""
    if value is None:
        return []
    if isinstance(value, str):
        return [(value.strip(), None, None)] if value.strip() else []
    out = []
    for i, item in enumerate(_list(value, where)):
        if isinstance(item, str):
            if item.strip():
                out.append((item.strip(), None, None))
            continue
        item = _dict(item, f"{where}[{i}]")
        text = item.get("warning", item.get("warnings", item.get("msg", "")))
        ident, sev = item.get("error_id"), item.get("error_severity")
        out.append((_label(text).strip(), _small_int(ident), _small_int(sev)))
    return out


def _small_int(value) -> int | None:
    return value if type(value) is int and 0 <= value < MAX_ID else None


def _result_gpu(result: dict) -> tuple[int | None, str | None]:
    """(GPU index, other entity such as "CPU0") of one result: 4.x entity_group/entity_id, 3.3 gpu_id,
    3.0-3.2 gpu_ids."""
    group = result.get("entity_group")
    ident = result.get("entity_id")
    if ident is None:
        ident = result.get("gpu_id", result.get("gpu_ids"))
    if isinstance(ident, bool) or ident is None:
        return None, None
    if isinstance(ident, str):
        found = _indices(ident)
        ident = found[0] if len(found) == 1 else None
    if not isinstance(ident, int) or not 0 <= ident < MAX_ID:
        return None, None
    if isinstance(group, str) and group.strip().upper() not in ("GPU", ""):
        return None, f"{group.strip()}{ident}"
    return ident, None


PERSISTENCE_MODE_ID = 29  # DCGM_FR_PERSISTENCE_MODE: this project warns on persistence mode (gpu.settings)


def _json_test(raw, section: str | None, where: str) -> DiagTest:
    t = _dict(raw, where)
    test = DiagTest(_label(t.get("name")) or "(unnamed test)", section, "Not Run")
    worst: str | None = None
    for i, r in enumerate(_list(t.get("results"), f"{where}.results")):
        r = _dict(r, f"{where}.results[{i}]")
        result, note = _status(r.get("status"))
        index, other = _result_gpu(r)
        prefix = f"GPU {index} " if index is not None else f"{other} " if other else ""
        messages = _messages(r.get("warnings"), f"{where}.results[{i}].warnings")
        if result == "Fail" and messages and all(m[1] == PERSISTENCE_MODE_ID for m in messages):
            result = "Warn"  # JSON prints a warning as Fail; persistence mode off is a warning here, as in gpu.settings
        if note:
            messages.append((note, None, None))
        worst = _worse(worst, result)
        if index is not None:
            test.per_gpu[index] = _worse(test.per_gpu.get(index), result)
        for text, ident, sev in messages:
            test.details.append(("Warning", text if index is not None and _detail_gpu(text) == index
                                 else prefix + text))
            if ident is not None or sev is not None:
                test.codes.append((index, ident, sev))
        for text, _, _ in _messages(r.get("info"), f"{where}.results[{i}].info"):
            test.details.append(("Info", text if index is not None and _detail_gpu(text) == index else prefix + text))
    summary = t.get("test_summary")
    if summary is not None:
        summary = _dict(summary, f"{where}.test_summary")
        if "status" in summary:
            result, note = _status(summary.get("status"))
            if not (result == "Fail" and worst == "Warn"):  # the summary's Fail is the warning printed as Fail
                worst = _worse(worst, result)
            if note:
                test.details.append(("Warning", note))
        if not any(r in BAD for r in test.per_gpu.values()):  # the summary's messages say what no GPU result says
            known = {d[1] for d in test.details}
            for text, ident, sev in _messages(summary.get("warnings"), f"{where}.test_summary.warnings"):
                if text not in known:
                    test.details.append(("Warning", text))
                    test.codes.append((None, ident, sev))
    test.result = worst or "Not Run"
    return _finish(test)


def _serials(root: dict, doc: dict) -> dict[int, str]:
    """GPU index -> serial: 3.x ``GPU Device Serials``, 4.x ``entity_groups[].entities[].serial_num``."""
    out: dict[int, str] = {}
    for holder in (doc, root):
        serials = holder.get("GPU Device Serials")
        if isinstance(serials, dict):
            for key, value in serials.items():
                if re.fullmatch(r"\s*\d{1,6}\s*", key) and isinstance(value, str) and value.strip():
                    out[int(key)] = value.strip()
        groups = holder.get("entity_groups")
        for group in groups if isinstance(groups, list) else []:
            if not isinstance(group, dict) or str(group.get("entity_group", "GPU")).upper() != "GPU":
                continue
            entities = group.get("entities")
            for ent in entities if isinstance(entities, list) else []:
                if not isinstance(ent, dict):
                    continue
                ident, serial = ent.get("entity_id"), ent.get("serial_num")
                if _small_int(ident) is not None and isinstance(serial, str) and serial.strip():
                    out[ident] = serial.strip()
    return out


def parse_dcgmi_json(text: str) -> DiagReport | None:
    """Parse ``dcgmi diag -j`` output (DCGM 3.x or 4.x); None when the text holds no JSON object (then the
    caller reads the text table). A JSON document of the wrong shape is a report with an error."""
    doc = _find_json(text)
    if doc is None:
        return None
    report = DiagReport(source="json")
    root_key = next((k for k in JSON_ROOTS if k in doc), None)
    if root_key is None:
        keys = ", ".join(repr(k)[:40] for k in list(doc)[:5]) or "none"
        report.errors.append(f"dcgmi printed JSON without a {' or '.join(map(repr, JSON_ROOTS))} object "
                             f"(keys: {keys})")
        return report
    try:
        root = _dict(doc[root_key], root_key)
        metas = [m for m in (doc.get("metadata"), root.get("metadata")) if isinstance(m, dict)]
        for source in (doc, root, *metas):  # 3.x: beside or in the root object; 4.x: metadata{}
            version = source.get("version")
            if isinstance(version, str) and version.strip():
                report.metadata["DCGM Version"] = version.strip()
            driver = source.get("Driver Version Detected")
            if isinstance(driver, str) and driver.strip():
                report.metadata["Driver Version Detected"] = driver.strip()
        report.serials = _serials(root, doc)
        runtime_error = root.get("runtime_error")
        if runtime_error is not None:
            report.errors.append(_label(runtime_error).strip() or "dcgmi reported an empty runtime_error")
        warning = root.get("warning")
        if isinstance(warning, str) and warning.strip():
            report.notes.append(warning.strip())
        for c, cat in enumerate(_list(root.get("test_categories"), f"{root_key}.test_categories")):
            cat = _dict(cat, f"test_categories[{c}]")
            section = _label(cat.get("category")) or None
            for i, raw in enumerate(_list(cat.get("tests"), f"test_categories[{c}].tests")):
                report.tests.append(_json_test(raw, section, f"test_categories[{c}].tests[{i}]"))
    except _Shape as exc:
        report.errors.append(f"dcgmi's JSON is not DCGM's documented shape: {exc}")
    _guard_unplaced(report, _json_statuses(doc))
    return report


def _json_statuses(doc) -> list[str]:
    """Every string under a ``status`` key anywhere in the document (an iterative walk, bounded)."""
    out, todo, seen = [], [doc], 0
    while todo and seen < 100_000:
        node = todo.pop()
        seen += 1
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "status" and isinstance(value, str):
                    out.append(value.strip())
                elif isinstance(value, (dict, list)):
                    todo.append(value)
        elif isinstance(node, list):
            todo.extend(v for v in node if isinstance(v, (dict, list)))
    return [s for s in out if RESULT_CELL_RX.fullmatch(s)]


def parse_output(text: str) -> DiagReport:
    """Whatever dcgmi printed: its JSON when there is any, else its text table."""
    report = parse_dcgmi_json(text)
    return report if report is not None else parse_dcgmi_diag(text)


# --- the judge -------------------------------------------------------------------------------------------------


def summarise_details(details: list[tuple[str, str]], kinds=("Warning", "Error"), limit: int = 400) -> str:
    """Group identical per-GPU texts: 'GPU 0 X', 'GPU 1 X' -> 'GPU 0, 1: X'."""
    groups: dict[str, list[str]] = {}
    for kind, text in details:
        if kind not in kinds:
            continue
        m = DETAIL_GPU_RX.match(text)
        gpu, body = (m.group(1), m.group(2)) if m else (None, text)
        groups.setdefault(body, [])
        if gpu is not None:
            groups[body].append(gpu)
    parts = [f"GPU {', '.join(g)}: {body}" if g else body for body, g in groups.items()]
    return _cap("; ".join(parts), limit)


def _cap(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _fabric_hint(text: str) -> str:
    if "system not yet initialized" in text:
        return ("CUDA reports 'system not yet initialized' on NVSwitch systems (HGX/DGX) until nvidia-fabricmanager "
                "runs with the driver's exact version: `systemctl status nvidia-fabricmanager`. ")
    return ""


REMEDIATION_FAIL = ("Read DCGM's text above; rerun `dcgmi diag -r 3` on the idle node for detail. A GPU that fails "
                    "memory or hardware tests again after a reset (`nvidia-smi -r -i {n}`) needs replacement; check "
                    "`dmesg` for Xid errors and `nvidia-smi -q -d ECC,ROW_REMAPPER`.")
# Memory and board faults: DCGM_FR_* ids 4 (volatile DBE), 85 (row remap pending), 101 (Xid); severity 6 = RESET.
MEMORY_RX = re.compile(r"uncorrectable|row remap|remapping|retired? pages?|page retire|double[- ]bit|\bDBE\b|\bECC\b|"
                       r"\bXid\b|fallen off the bus|inforom", re.IGNORECASE)
MEMORY_ERROR_IDS = frozenset({4, 85, 101})
SEVERITY_RESET, SEVERITY_CONFIG = 6, 5
CONFIG_RX = re.compile(r"persistence mode|environment variable|permission|graphics process|denylist|blacklist",
                       re.IGNORECASE)


def remediation_for(text: str, gpu: int | None, codes=()) -> str:
    """What to do about a DCGM failure: reset then RMA for memory/board faults, the setting for a
    configuration fault, the fabric manager for CUDA's 'system not yet initialized', else the general advice."""
    n = str(gpu) if gpu is not None else "N"
    ids = {c[1] for c in codes}
    severities = {c[2] for c in codes}
    if MEMORY_RX.search(text) or ids & MEMORY_ERROR_IDS or SEVERITY_RESET in severities:
        return (f"Drain the node. With no process on GPU {n}, reset it (`nvidia-smi -r -i {n}`; on an NVSwitch "
                f"system stop nvidia-fabricmanager first, or reboot the node) so that pending row remappings are "
                f"applied, then rerun `dcgmi diag -r 2`. If it fails again, or `nvidia-smi -q -i {n} -d "
                f"ROW_REMAPPER` shows a remapping failure, the GPU needs an RMA: quote its serial "
                f"(`nvidia-smi -q -i {n}`, Serial Number).")
    hint = _fabric_hint(text)
    if not hint and (SEVERITY_CONFIG in severities or CONFIG_RX.search(text)):
        return "Fix the setting DCGM names above (it is configuration, not hardware), then rerun `dcgmi diag -r 1`."
    return hint + REMEDIATION_FAIL.format(n=n)


def _gpu_id(index: int, report: DiagReport, ids: dict[int, GpuId] | None) -> GpuId:
    known = (ids or {}).get(index)
    serial = report.serials.get(index)
    if known is not None:
        return known if known.serial or not serial else GpuId(index, known.uuid, known.pci_bus_id, serial)
    return GpuId(index, serial=serial)


def _gpu_body(details: list[tuple[str, str]], index: int, kinds=("Warning", "Error")) -> str:
    """GPU ``index``'s messages, without the leading "GPU n" where the rest reads on its own ("GPU 0 Error
    using ..." -> "Error using ..."; "GPU 5 has a pending ..." stays whole)."""
    bodies: list[str] = []
    for kind, text in details:
        m = DETAIL_GPU_RX.match(text)
        if kind in kinds and m and int(m.group(1)) == index:
            body = text if m.group(2)[:1].islower() else m.group(2)
            if body not in bodies:
                bodies.append(body)
    return _cap("; ".join(bodies))


def _error_section(error: str) -> tuple[str | None, str]:
    m = re.match(r"(Deployment|Metadata|Hardware|Integration|Stress|Software):\s*(.*)", error, re.S)
    return (m.group(1), m.group(2)) if m else (None, error)


def _error_verdicts(report: DiagReport, error: str, base: dict, ids, *, stopped: bool) -> list[Verdict]:
    section, text = _error_section(error)
    if stopped and section is None:
        section = "Deployment"  # DCGM stopped before any test: its deployment checks found this
    gpus = sorted({int(g) for g in GPU_RX.findall(text)})
    head = "DCGM stopped before running its tests" if stopped else "DCGM error"
    if not gpus:
        return [Verdict(Status.FAIL, _cap(f"{head}: {text}"), base, {}, remediation_for(text, None), "errors")]
    return [Verdict(Status.FAIL, _cap(f"{head}: {text}"), dict(base, gpu_index=g), {}, remediation_for(text, g),
                    f"{section or 'errors'} gpu{g}", _gpu_id(g, report, ids)) for g in gpus]


def judge_diag(report: DiagReport, level: int, returncode: int | None, output_tail: str = "",
               ids: dict[int, GpuId] | None = None) -> list[Verdict]:
    """Verdicts for one ``dcgmi diag`` run: per test, and per GPU for each GPU a test fails or warns on;
    errors of the run (a Deployment error naming a GPU fails that GPU). ``ids``: NVML's identities by index."""
    base = {"level": level, "format": report.source}
    if "DCGM Version" in report.metadata:
        base["dcgm_version"] = report.metadata["DCGM Version"]
    if not report.tests:
        errors = report.errors or [line for line in report.other if GPU_RX.search(line)]
        named = [e for e in errors if GPU_RX.search(_error_section(e)[1])]
        if named:
            verdicts = []
            for error in errors:
                verdicts.extend(_error_verdicts(report, error, base, ids, stopped=True))
            return verdicts
        if errors:
            first = errors[0]
            hint = ("Start the DCGM host engine (`systemctl start nvidia-dcgm` or `nv-hostengine`) and rerun. "
                    if re.search(r"host ?engine|connect", first, re.I) else "")
            return [Verdict(Status.FAIL, _cap(f"dcgmi diag -r {level} did not run: {first}"), base, {},
                            hint + _fabric_hint(first) + f"Run `dcgmi diag -r {level}` by hand to see the full "
                                                         "message.")]
        last = output_tail.strip().splitlines()[-1] if output_tail.strip() else "no output"
        return [Verdict(Status.FAIL, _cap(f"dcgmi diag -r {level} printed no results (exit code {returncode}): "
                                          f"{last}"),
                        base, {}, f"Run `dcgmi diag -r {level}` by hand; check that nv-hostengine runs.")]
    verdicts = []
    for test in report.tests:
        verdicts.extend(_test_verdicts(report, test, base, ids))
    for error in report.errors:
        verdicts.extend(_error_verdicts(report, error, base, ids, stopped=False))
    return verdicts


WARN_FIX = "Read DCGM's warning; it does not stop fine-tuning but may cost speed."


def _test_verdicts(report: DiagReport, test: DiagTest, base: dict, ids) -> list[Verdict]:
    """One verdict per GPU the test fails or warns on (with that GPU's messages and identity); one for the
    test when no GPU is named as failing, or when it also failed for a reason tied to no GPU."""
    measured = dict(base, result=test.result)
    for result, listed in _gpu_texts(test.gpus).items():
        measured[f"gpus_{result.lower().replace(' ', '_')}"] = listed
    expected = {"result": "Pass"}
    out: list[Verdict] = []
    bad = {g: r for g, r in sorted(test.per_gpu.items()) if r in BAD}
    for g, result in bad.items():
        body = _gpu_body(test.details, g)
        codes = [c for c in test.codes if c[0] == g]
        m = dict(measured, result=result, gpu_index=g)
        if any(c[1] is not None for c in codes):
            m["dcgm_error_ids"] = ", ".join(str(c[1]) for c in codes if c[1] is not None)
        head = f"DCGM {test.name}: {result} on GPU {g}"
        status, fix = (Status.FAIL, remediation_for(body, g, codes)) if result == "Fail" else (Status.WARN, WARN_FIX)
        out.append(Verdict(status, _cap(f"{head}: {body}" if body else head), m, expected, fix,
                           f"{test.name} gpu{g}", _gpu_id(g, report, ids)))
    rest = [d for d in test.details if _detail_gpu(d[1]) not in bad]
    if bad and not any(kind in ("Warning", "Error") and _detail_gpu(text) is None for kind, text in rest):
        return out
    listed = _gpu_texts(test.gpus).get(test.result)
    where = "" if not listed or bad else " on all GPUs" if listed == "All" else f" on GPU(s) {listed}"
    head = f"DCGM {test.name}: {test.result}{where}"
    details = summarise_details(rest)
    message = _cap(f"{head}: {details}" if details else head)
    only = _indices(listed) if listed and listed != "All" and not bad else []
    single = only[0] if len(only) == 1 else None
    gid = _gpu_id(single, report, ids) if single is not None else None
    codes = [c for c in test.codes if c[0] not in bad]
    if test.result == "Fail":
        out.append(Verdict(Status.FAIL, message, measured, expected, remediation_for(details, single, codes),
                           test.name, gid))
    elif test.result == "Warn":
        out.append(Verdict(Status.WARN, message, measured, expected, WARN_FIX, test.name, gid))
    elif test.result in ("Skip", "Not Run"):
        out.append(Verdict(Status.SKIP, f"{head} (DCGM did not run this test)", measured, expected, subject=test.name))
    else:
        out.append(Verdict(Status.PASS, head, measured, expected, subject=test.name, gpu=gid))
    return out


# --- running dcgmi -----------------------------------------------------------------------------------------------


def run_dcgmi(binary: str, level: int, *, json_output: bool = False,
              timeout_s: float | None = None) -> tuple[int | None, str]:
    """(exit code, whole output) of ``dcgmi diag -r <level> [-j]``, run with a deadline through the process
    layer (the whole tree killed past it). A run that did not end by itself gets an ``Error:`` line
    saying how, which the parsers report; its exit code is None."""
    timeout_s = TIMEOUT_S[level] if timeout_s is None else timeout_s
    argv = [binary, "diag", "-r", str(level)] + (["-j"] if json_output else [])
    shown = " ".join(["dcgmi"] + argv[1:])
    done = run_command(argv, timeout_s)
    if done.exit is None:
        return None, f"Error: {shown} did not start: {done.error}"
    if done.exit.timed_out or done.exit.signal:  # "timed out after 270 s and was killed", "crashed with SIGSEGV"
        return None, done.output + f"\nError: {shown} {done.exit.describe(timeout_s)}"
    return done.exit.code, done.output


@dataclass
class Diagnosis:
    report: DiagReport
    returncode: int | None
    output: str
    command: str


def diagnose(binary: str, level: int) -> Diagnosis:
    """Run ``dcgmi diag -r N -j`` and read its JSON; when it printed neither JSON nor a table nor an error
    and ended by itself (a dcgmi without ``-j``), run it once more without ``-j`` inside the level's
    deadline and read the table."""
    started = time.monotonic()
    rc, text = run_dcgmi(binary, level, json_output=True)
    report = parse_dcgmi_json(text)
    if report is not None:
        return Diagnosis(report, rc, text, f"dcgmi diag -r {level} -j")
    report = parse_dcgmi_diag(text)
    left = TIMEOUT_S[level] - (time.monotonic() - started)
    if rc is None or report.tests or report.errors or left < MIN_RERUN_S:
        return Diagnosis(report, rc, text, f"dcgmi diag -r {level} -j")
    rc, text = run_dcgmi(binary, level, timeout_s=left)
    return Diagnosis(parse_dcgmi_diag(text), rc, text, f"dcgmi diag -r {level}")


def nvml_ids(nvml) -> dict[int, GpuId]:
    """NVML's identity of every GPU by index (UUID, PCI bus id, serial); {} when NVML cannot tell. DCGM's
    GPU ids are NVML's indices."""
    try:
        nvml.nvmlInit()
    except Exception:  # no driver, no library: the verdicts keep DCGM's index (and serial) alone
        return {}
    out: dict[int, GpuId] = {}
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(index)
            fields = []
            for call in (nvml.nvmlDeviceGetUUID, lambda handle: nvml.nvmlDeviceGetPciInfo(handle).busId,
                         nvml.nvmlDeviceGetSerial):
                try:
                    value = call(h)
                    value = value.decode() if isinstance(value, bytes) else str(value)
                    fields.append(value or None)
                except Exception:
                    fields.append(None)
            out[index] = GpuId(index, *fields)
    except Exception:
        pass
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return out


def _identities() -> dict[int, GpuId]:
    try:
        from checks.gpu.nvml import load_nvml

        return nvml_ids(load_nvml())
    except ImportError:
        return {}


def level_for(ctx: Context) -> int:
    """``--dcgm-level`` (``options["dcgm_level"]``), else 1 with ``--quick`` and 2 otherwise; ValueError
    for anything but 1-4."""
    raw = ctx.options.get("dcgm_level")
    if raw is None:
        return QUICK_LEVEL if ctx.quick else FULL_LEVEL
    if isinstance(raw, bool) or str(raw).strip() not in {str(n) for n in LEVELS}:
        raise ValueError(f"the DCGM level must be one of 1, 2, 3, 4, not {str(raw)[:20]!r}")
    return int(str(raw).strip())


@check("gpu.dcgm_diag", "NVIDIA DCGM diagnostic (dcgmi diag -r N -j: 1 with --quick, 2 full, --dcgm-level 1-4), "
                        "when DCGM is installed",
       isolate=True, exclusive=True, needs=("gpu.driver",), needs_gpus=True, timeout_s=CHECK_TIMEOUT_S)
def gpu_dcgm_diag(ctx: Context) -> list[Verdict]:
    try:
        level = level_for(ctx)
    except ValueError as exc:
        return [Verdict(Status.ERROR, str(exc), {}, {"dcgm_level": "1, 2, 3 or 4"})]
    binary = shutil.which("dcgmi")
    if binary is None:
        return [Verdict(Status.SKIP, "dcgmi (NVIDIA DCGM) is not on PATH; install datacenter-gpu-manager to add its "
                                     "diagnostic to this verify", {}, {})]
    ctx.progress(f"dcgmi diag -r {level} (up to {TIMEOUT_S[level]:g} s)")
    done = diagnose(binary, level)
    verdicts = judge_diag(done.report, level, done.returncode, done.output[-2000:], _identities())
    for v in verdicts:
        v.measured.setdefault("command", Value(done.command))
    return verdicts
