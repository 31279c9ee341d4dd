"""NVIDIA nccl-tests' ``all_reduce_perf``: run it at one size through :mod:`checks.proc`, parse what it
prints (every layout since the ``error`` column), and judge its bus bandwidth beside the torch figure.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from checks import proc
from checks.figures import Expectation, thresholds
from checks.nccl.allreduce import REMEDIATION_NCCL, MiB, expected_busbw, fabric_hint, judge_busbw
from checks.node import Node
from checks.result import Status, Value, Verdict


@dataclass
class NcclTestsRow:
    size: int
    count: int
    type: str
    redop: str
    root: int | None
    time_us: float | None  # out-of-place
    algbw: float | None
    busbw: float | None
    wrong: int | None  # "#wrong" (None: "N/A" or the old "error" column)
    in_time_us: float | None
    in_algbw: float | None
    in_busbw: float | None
    in_wrong: int | None
    error: float | None = None  # old nccl-tests: max error instead of #wrong
    in_error: float | None = None
    unreadable: list[str] = field(default_factory=list)  # "#wrong (in-place) '1.2.3'": columns that were no number
    unvalidated: bool = False  # "#wrong" printed as a placeholder (N/A): nccl-tests did not check the values

    @property
    def correctness_unreadable(self) -> list[str]:
        """The unreadable cells of the columns that say whether the values were right (#wrong, error)."""
        return [u for u in self.unreadable if u.startswith(("#wrong", "error"))]


@dataclass
class NcclTestsReport:
    version: str | None = None  # "2.17.8" (newer nccl-tests print it)
    nccl_library: str | None = None  # "22902"
    n_threads: int | None = None
    n_gpus: int | None = None  # per thread
    min_bytes: int | None = None
    max_bytes: int | None = None
    warmup_iters: int | None = None
    iters: int | None = None
    devices: list[tuple[int, str]] = field(default_factory=list)  # (rank, device name)
    rows: list[NcclTestsRow] = field(default_factory=list)
    avg_busbw: float | None = None
    out_of_bounds: int | None = None
    out_of_bounds_line: str | None = None  # "# Out of bounds values : 12 FAILED" as printed
    out_of_bounds_failed: bool = False  # the line says FAILED, or its count is above 0
    out_of_bounds_unreadable: bool = False  # the line is there but its count is no number
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # "NCCL WARN" lines (printed with NCCL_DEBUG=WARN/INFO)

    @property
    def ranks(self) -> int | None:
        if self.devices:
            return len(self.devices)
        if self.n_gpus is not None:
            return self.n_gpus * (self.n_threads or 1)
        return None


NEW_COLUMNS = ["size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong",
               "time", "algbw", "busbw", "#wrong"]
DEVICE_RX = re.compile(r"#\s*Rank\s+(\d+)\s+(?:Group\s+\d+\s+)?Pid\s+\d+\s+on\s+\S+\s+device\s+\d+\s+\[[^\]]*\]\s+(.+)")
ERROR_RX = re.compile(r"\b(failure|failed|error|abort(ed)?)\b|Segmentation fault", re.IGNORECASE)


# The one number parser for everything nccl-tests prints in its table: integers ("1048576", "-1"), fixed
# ("1081.14") and %g's e-notation ("1.04858e+06", "0e+00"). Nothing else: Python's float() would also take
# "inf", "nan", "1_000" and "infinity", none of which nccl-tests prints and none of which may read as a number.
NUMBER_RX = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)  # ASCII: "６３" is no number
# Cells nccl-tests prints where it has no value (validation off: "N/A"); a placeholder is never 0.
PLACEHOLDERS = frozenset({"n/a", "na", "-", "--"})


class NotANumber(ValueError):
    """A table cell that should hold a number and does not."""


def parse_number(text: str) -> float | int | None:
    """An int for an integer cell, a float for a fixed or e-notation one, None for a placeholder (``N/A``);
    :class:`NotANumber` for anything else."""
    t = text.strip()
    if t.lower() in PLACEHOLDERS:
        return None
    if not NUMBER_RX.fullmatch(t):
        raise NotANumber(f"{text[:40]!r} is not a number")
    if re.fullmatch(r"[+-]?[0-9]+", t):
        return int(t)
    value = float(t)
    if not math.isfinite(value):
        raise NotANumber(f"{text[:40]!r} is out of range")
    return value


def parse_count(text: str) -> int | None:
    """A count (#wrong, out-of-bounds values, a size): a non-negative number, %g-printed ones included
    ("1.04858e+06" -> 1048580), rounded up so that a fraction never reads as fewer; None for a placeholder."""
    value = parse_number(text)
    if value is None:
        return None
    if value < 0:
        raise NotANumber(f"{text[:40]!r} is negative")
    return int(math.ceil(value))


def _int_header(rx: str, text: str) -> int | None:
    m = re.search(rx, text)
    return int(m.group(1)) if m else None


def _row(tokens: list[str], columns: list[str]) -> NcclTestsRow | None:
    """A table row, or None when the line is not one (wrong number of cells, or no size and count)."""
    if len(tokens) != len(columns):
        return None
    try:
        size, count = parse_count(tokens[0]), parse_count(tokens[1])
    except NotANumber:
        return None
    if size is None or count is None:
        return None
    times = [i for i, c in enumerate(columns) if c == "time"]
    if len(times) != 2:
        return None
    lead = dict(zip(columns[:times[0]], tokens[:times[0]], strict=True))
    unreadable: list[str] = []
    placeholders: list[str] = []

    def cell(cols: dict, name: str, place: str, parse=parse_number):
        if name not in cols:
            return None
        try:
            value = parse(cols[name])
        except NotANumber:
            unreadable.append(f"{name}{place} {cols[name][:40]!r}")
            return None
        if value is None:
            placeholders.append(name)
        return value

    def side(start: int, end: int, place: str) -> tuple:
        cols = dict(zip(columns[start:end], tokens[start:end], strict=True))
        return (cell(cols, "time", place), cell(cols, "algbw", place), cell(cols, "busbw", place),
                cell(cols, "#wrong", place, parse_count), cell(cols, "error", place))

    t, a, b, w, e = side(times[0], times[1], "")
    ti, ai, bi, wi, ei = side(times[1], len(columns), " (in-place)")
    root = cell(lead, "root", "")
    row = NcclTestsRow(size, count, lead.get("type", ""), lead.get("redop", ""),
                       int(root) if isinstance(root, int) else None, t, a, b, w, ti, ai, bi, wi, e, ei)
    row.unreadable = unreadable
    row.unvalidated = "#wrong" in placeholders or "error" in placeholders
    return row


OUT_OF_BOUNDS_RX = re.compile(r"Out of bounds values\s*:\s*(\S*)\s*(\w*)")


def parse_nccl_tests(text: str) -> NcclTestsReport:
    """Parse nccl-tests output (all_reduce_perf and friends): header, devices, rows, average, errors.

    Columns are read from the table's own header line, so the older layout (``error`` instead of
    ``#wrong``, no ``root``) and the newer, wider one both parse; without a header line the newer layout
    is assumed. Error lines (``Test CUDA failure ...``, ``NCCL WARN``) are collected in order."""
    report = NcclTestsReport()
    columns = NEW_COLUMNS
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line.lstrip("#").strip()
            m = re.match(r"nccl-tests version\s+(\S+)", body)
            if m:
                report.version = m.group(1)
                lib = re.search(r"nccl-library=(\d+)", body)
                report.nccl_library = lib.group(1) if lib else None
            if re.match(r"nThread\s+\d+", body):
                report.n_threads = _int_header(r"nThread\s+(\d+)", body)
                report.n_gpus = _int_header(r"nGpus\s+(\d+)", body)
                report.min_bytes = _int_header(r"minBytes\s+(\d+)", body)
                report.max_bytes = _int_header(r"maxBytes\s+(\d+)", body)
                report.warmup_iters = _int_header(r"warmup iters:\s*(\d+)", body)
                report.iters = _int_header(r"(?<!warmup )(?<!agg )iters:\s*(\d+)", body)
            m = DEVICE_RX.match(line)
            if m:
                report.devices.append((int(m.group(1)), m.group(2).strip()))
            tokens = body.split()
            if tokens[:2] == ["size", "count"] and tokens.count("time") == 2:
                columns = tokens
            m = re.match(r"Avg bus bandwidth\s*:\s*(\S+)", body)
            if m:
                try:
                    report.avg_busbw = parse_number(m.group(1))
                except NotANumber:
                    report.avg_busbw = None  # shown only, never judged
            m = OUT_OF_BOUNDS_RX.match(body)
            if m:
                report.out_of_bounds_line = line
                try:
                    report.out_of_bounds = parse_count(m.group(1))
                except NotANumber:
                    report.out_of_bounds, report.out_of_bounds_unreadable = None, True
                report.out_of_bounds_failed = (report.out_of_bounds or 0) > 0 or m.group(2).upper() == "FAILED"
            continue
        row = _row(line.split(), columns)
        if row is not None:
            report.rows.append(row)
        elif " NCCL WARN " in f" {line} ":
            report.warnings.append(line)
        elif " NCCL INFO " in f" {line} ":  # NCCL_DEBUG=INFO chatter ("Failed to find plugin ...") is not an error
            continue
        elif ERROR_RX.search(line):
            report.errors.append(line)
    return report


# Wrong values after an all-reduce are data corruption: memory, ECC or a GPU in a bad state, not a transport
# to tune (REMEDIATION_NCCL is about transports and is not given for these).
REMEDIATION_CORRUPTION = (
    "Data corruption, not a transport problem: drain the node; read gpu.ecc / gpu.memory_errors "
    "(`nvidia-smi -q -d ECC,ROW_REMAPPER`: uncorrectable ECC errors, pending row remaps) and gpu.xid (Xid 48, "
    "63, 64, 94, 95, 74); reset the GPUs (`nvidia-smi -r`) or reboot, then run `dcgmi diag -r 3` and "
    "all_reduce_perf again; RMA the GPU if it repeats.")


def _corruption(report: NcclTestsReport) -> str | None:
    """Why the run shows wrong values (every row and the out-of-bounds line), or None."""
    wrong = [(row.size, sum(w for w in (row.wrong, row.in_wrong) if w)) for row in report.rows]
    wrong = [(size, n) for size, n in wrong if n]
    parts = []
    if wrong:
        sizes = ", ".join(f"{n} at {size} B" for size, n in wrong[:3]) + (" ..." if len(wrong) > 3 else "")
        parts.append(f"{sum(n for _, n in wrong)} wrong element(s) ({sizes})")
    if report.out_of_bounds_failed:
        parts.append(f"'{(report.out_of_bounds_line or '').lstrip('#').strip()}'")
    return "; ".join(parts) or None


def judge_nccl_tests(report: NcclTestsReport, returncode: int | None, exp: Expectation, floor_ratio: float,
                     torch_busbw: float | None = None, output_tail: str = "") -> Verdict:
    measured: dict = {}
    if report.version:
        measured["nccl_tests"] = report.version
    if returncode is not None:
        measured["exit_code"] = returncode
    if torch_busbw is not None:
        measured["torch_busbw"] = Value(round(torch_busbw, 3), "GB/s")
    expected: dict = {"wrong_elements": 0}
    corrupt = _corruption(report)
    if corrupt:  # first: whatever else went wrong, wrong values are the finding
        measured["wrong_elements"] = sum(sum(w for w in (r.wrong, r.in_wrong) if w) for r in report.rows)
        if report.out_of_bounds is not None:
            measured["out_of_bounds_values"] = report.out_of_bounds
        return Verdict(Status.FAIL, f"all_reduce_perf found corrupted data: {corrupt}", measured, expected,
                       REMEDIATION_CORRUPTION)
    if report.errors:
        first = report.errors[0]
        return Verdict(Status.FAIL, f"all_reduce_perf failed: {first}", measured, expected,
                       fabric_hint(first) + REMEDIATION_NCCL)
    if not report.rows:
        last = output_tail.strip().splitlines()[-1] if output_tail.strip() else "no output"
        return Verdict(Status.FAIL, f"all_reduce_perf printed no results (exit code {returncode}): {last}",
                       measured, expected, REMEDIATION_NCCL)
    unreadable = [f"{u} at {r.size} B" for r in report.rows for u in r.correctness_unreadable]
    if report.out_of_bounds_unreadable:
        unreadable.append(f"'{(report.out_of_bounds_line or '').lstrip('#').strip()[:80]}'")
    if unreadable:  # never 0: an unreadable count says nothing about the values
        return Verdict(Status.ERROR, "cannot tell whether all_reduce_perf's values were right: "
                                     + "; ".join(unreadable[:3]) + " (not a number)", measured, expected,
                       "Run all_reduce_perf by hand and read its #wrong columns; report the output format to "
                       "peftnode if it is a new one.")
    row = max(report.rows, key=lambda r: r.size)
    ranks = report.ranks or 0
    measured.update(ranks=ranks, bytes=Value(row.size, "B"))
    if row.time_us is not None:
        measured["time"] = Value(row.time_us, "us")
    if row.algbw is not None:
        measured["algbw"] = Value(row.algbw, "GB/s")
    if row.in_busbw is not None:
        measured["busbw_in_place"] = Value(row.in_busbw, "GB/s")
    measured["wrong_elements"] = 0
    if returncode not in (0, None):
        return Verdict(Status.FAIL, f"all_reduce_perf reported exit code {returncode}", measured, expected,
                       "A failed run: check `dmesg` for Xid errors and NVLink counters (`nvidia-smi nvlink -e`); "
                       "run `dcgmi diag -r 3`.")
    if row.busbw is None:
        bad = [u for u in row.unreadable if u.startswith("busbw")]
        return Verdict(Status.ERROR, "all_reduce_perf printed a row without a readable busbw"
                                     + (f" ({bad[0]})" if bad else ""), measured, expected)
    measured["busbw"] = Value(row.busbw, "GB/s")
    what = f"nccl-tests all_reduce_perf, {row.size / MiB:g} MiB across {ranks} GPUs"
    if torch_busbw is not None:
        what += f" (torch nccl.allreduce: {torch_busbw:.4g} GB/s)"
    verdict = judge_busbw(row.busbw, exp, floor_ratio, what, measured, expected)
    if verdict.status is Status.PASS and any(r.unvalidated for r in report.rows):
        verdict.status = Status.WARN
        verdict.message += "; nccl-tests did not check the values (#wrong N/A: run with -c 1)"
        verdict.remediation = "Run all_reduce_perf with validation on (-c 1, its default) to check the sums."
    if report.warnings and verdict.status is Status.PASS:
        verdict.status = Status.WARN
        verdict.message += f"; NCCL warned: {report.warnings[0]}"
        verdict.remediation = REMEDIATION_NCCL
    return verdict


def run_all_reduce_perf(binary: str, nbytes: int, gpus: int, quick: bool, timeout_s: float) -> tuple[int | None, str]:
    """(exit code, all it printed). A timeout or a crash has no exit code and ends the output with an
    ``Error:`` line saying so, which the parser reports like any error line."""
    argv = [binary, "-b", str(nbytes), "-e", str(nbytes), "-f", "2", "-g", str(gpus)]
    if quick:
        argv += ["-w", "3", "-n", "10"]
    ended = proc.run(argv, timeout_s=timeout_s, keep_output=True)
    text = ended.output
    if ended.code is None:
        text += f"\nError: all_reduce_perf {ended.describe(timeout_s)}\n"
    return ended.code, text


def nccl_tests_verdict(binary: str, gpus: int, nbytes: int, quick: bool, node: Node, torch_figure: float | None,
                       timeout_s: float) -> Verdict:
    """Run ``all_reduce_perf`` at ``nbytes`` on ``gpus`` GPUs and judge it, the torch figure beside it."""
    rc, text = run_all_reduce_perf(binary, nbytes, gpus, quick, timeout_s)
    report = parse_nccl_tests(text)
    device = report.devices[0][1] if report.devices else node.gpu_model
    exp = expected_busbw(device, report.ranks or gpus, node.perf)
    verdict = judge_nccl_tests(report, rc, exp, thresholds(node.perf)[0], torch_figure, text[-2000:])
    verdict.measured["command"] = Value(f"all_reduce_perf -b {nbytes} -e {nbytes} -g {gpus}")
    verdict.subject = "nccl-tests"
    return verdict
